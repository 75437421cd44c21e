"""Load-balancer providers: one module per provider, each a ``LoadBalancer``."""
