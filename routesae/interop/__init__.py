"""Other libraries' SAE formats: the exporter contract (:mod:`.base`), SAELens both ways (:mod:`.saelens`,
:mod:`.saelens_read`) and a routed SAE's parts (:mod:`.parts`)."""

from routesae.interop.base import Exporter

__all__ = ["Exporter"]
