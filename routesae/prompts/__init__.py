"""Built-in prompt templates (package data), in :class:`string.Template` syntax.

``explain.txt`` asks for a feature's category, monosemanticity score and explanation; its
placeholders are ``$contexts`` (required: the latent's contexts grouped by token class, the
activating token wrapped in ``<<``/``>>``) and ``$latent`` (optional: the latent id).
``detect.txt`` asks which numbered excerpts activate an explained feature; its placeholders are
``$explanation`` and ``$contexts`` (required) and ``$count``, ``$latent`` (optional). Write ``$$``
for a literal dollar sign. A replacement template (``--prompt-template``/``--detection-template``)
must ask for the same answer format, since the answer parser reads it. State it as the built-in
templates do — a line that mentions ``format`` and ends with ``:``, then the format, one field per
line (``Feature category: <...>``) — and the local interpreter starts its answer with the first
label (see :func:`routesae.interpreters.local.answer_prefix`).
"""
