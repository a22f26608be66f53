"""`ray` for a node that joins a cluster on this machine's loopback (Ray 2.60): the second node of
a one-machine cluster, as cluster/start_worker.sh runs it when NODE_IP is 127.0.0.1.

`ray start --address` refuses to join unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with that
set it replaces --node-ip-address 127.0.0.1 by the machine's address. Ray's gRPC servers (GCS,
raylet, every worker) listen on 127.0.0.1 only when the node address is exactly 127.0.0.1;
any other address, 127.0.0.2 included, makes them listen on every interface ([::]). So this
entry point allows the join and keeps the address as given; the node's processes inherit
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 from the script and stay on 127.0.0.1 too. Both nodes then
share 127.0.0.1 and are told apart by node id and label. Nodes on other machines use plain `ray`.

    python cluster/loopback_ray.py start --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 ...
"""
import sys

from ray._private import ray_constants, services
from ray.scripts.scripts import main

if __name__ == "__main__":
    ray_constants.ENABLE_RAY_CLUSTER = True  # read when `ray start` runs: allow the join
    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1
    sys.exit(main())
