"""Load-balancer providers: one module per provider, each a ``LoadBalancer`` (see ``base.py``).

``build.build_balancers`` builds the configured ones; ``retry`` holds the shared retry/HTTP policy.
"""
