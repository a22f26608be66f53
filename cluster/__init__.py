"""Cluster plumbing: roles (named Ray actors and the group calls on them), transport (weight
broadcast from learner rank 0 to the engines), netutil (loopback-bound rendezvous)."""

NAMESPACE = "polaris"  # the Ray namespace of every named actor of a run
