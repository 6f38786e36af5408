"""SAE architectures: the contract (:mod:`.base`) and the built-ins, each in its own module.

The built-ins are registered by :mod:`.builtin` through the ``routesae`` entry point, the same path
a third-party architecture takes; importing this package registers nothing.
"""
