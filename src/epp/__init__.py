"""epp: an Envoy ext_proc Endpoint Picker with a pluggable scheduling framework."""

__version__ = "0.1.0"
