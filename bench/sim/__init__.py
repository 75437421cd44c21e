"""The fleet simulator behind ``bench/fleetsim.py``: what one node is measured to do, scaled to a fleet.

Modules, in the order data flows through them:

- ``schedule``: the common shape of an interruption history (evictions, spot and on-demand hours);
- ``traces``: SpotHedge/SkyServe trace files (live spot instances per slot, per zone) -> a schedule;
- ``synthetic``: AWS Spot Instance Advisor buckets and notice windows -> a seeded schedule;
- ``workload``: request lengths and arrival rate (Azure LLM inference trace CSV, JSON lines, or the bench's);
- ``measured``: the JSON that ``bench/fleet.py`` and ``bench/migrate.py`` write, checked and summarised;
- ``behaviour``: each policy's node timeline (when it stops taking work, when it cuts, peers, resume);
- ``outcome``: what one request sees at an eviction, and tables of it per request class;
- ``fleet``: the event loop over evictions, counting every request once; costs;
- ``report`` / ``picture``: the table, the JSON and the SVG;
- ``validate``: the 3-node check against ``bench/fleet.py``'s own measurement.
"""
