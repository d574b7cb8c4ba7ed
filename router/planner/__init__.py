"""The planner: latency profiles, a discrete-event simulator of the cluster, and the plan search.

Pure Python (stdlib + numpy for the least-squares fit): no torch, Ray or gRPC,
no clocks. `pdcluster profile` (cluster/bench/profile.py) measures the engine
and writes a profile; `pdcluster plan` runs `search.search_plan` over it.
See docs/planner.md.
"""
from router.planner.goodput import Goodput, at_rate, attainment, goodput, unit_rate_requests
from router.planner.profile import PhaseModel, PlannerError, Profile, ProfileError, load_profile
from router.planner.simulator import PoolSpec, RequestResult, SimConfig, Simulation, simulate

__all__ = ["Goodput", "PhaseModel", "PlannerError", "PoolSpec", "Profile", "ProfileError", "RequestResult",
           "SimConfig", "Simulation", "at_rate", "attainment", "goodput", "load_profile", "simulate",
           "unit_rate_requests"]
