"""How many replicas `serve --replicas` runs and how clients reach them: the plan, checked
before Ray is imported (server/cluster.py builds the Ray Serve application from it)."""

from __future__ import annotations

from dataclasses import dataclass

# Autoscaling aims at replicas this full (ongoing conversations / capacity).
DEFAULT_TARGET_LOAD = 0.75
# How clients reach the replicas (`serve --ingress`): "proxy", Ray Serve's Python proxy (our
# router and ConversationEndNotice), or "haproxy", Ray Serve's experimental HAProxy ingress
# (HAProxy carries the connections straight to the replicas' own HTTP servers: about ten
# times the messages a second, but leastconn balancing and a bare close when a replica dies).
INGRESSES = ("proxy", "haproxy")


@dataclass(frozen=True)
class Scaling:
    """How many replicas, each on how many GPUs, and how clients reach them (INGRESSES)."""

    replicas: int = 1
    min_replicas: int | None = None  # both set: autoscaling between them
    max_replicas: int | None = None
    gpus_per_replica: float | None = None  # None: one if the Ray cluster has GPUs, else none
    target_load: float = DEFAULT_TARGET_LOAD
    ingress: str = "proxy"

    def checked(self) -> Scaling:
        if self.ingress not in INGRESSES:
            raise ValueError(f"--ingress must be one of {', '.join(INGRESSES)}, got {self.ingress!r}")
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
        # At least one replica always: with none, the page and "busy" would wait for a model load.
        if self.min_replicas is not None and self.max_replicas is not None:
            if not 1 <= self.min_replicas <= self.replicas <= self.max_replicas:
                raise ValueError(
                    "autoscaling needs 1 <= --min-replicas <= --replicas <= --max-replicas, got "
                    f"{self.min_replicas} <= {self.replicas} <= {self.max_replicas}"
                )
        return self
