"""`kvindex demo`: a local cluster of simulated vLLM engines behind Envoy and the picker,
driven by a multi-tenant shared-prefix chat workload, once per routing policy."""
