"""Retention in the serving process: a loop that prunes what [retention] allows every
``check_interval_s``, and the SCP's last resort before it answers 0xA700 (storage/retention.py
says what is pruned and when)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from config.settings import NodeSettings
from core.loop import LoopThread
from storage import retention
from storage.db import Database
from storage.files import free_disk_mb
from storage.priors import prune_prior_store

log = logging.getLogger(__name__)

SPACE_PRIOR_AGE_DAYS = 1 / 24  # under disk pressure, prior images fetched over an hour ago go


def policy_of(settings: NodeSettings) -> retention.RetentionPolicy:
    return retention.RetentionPolicy(
        instances_days=settings.retention.instances_days,
        outputs_days=settings.retention.outputs_days,
        free_space_target_mb=settings.free_space_target_mb,
    )


class Pruner:
    """Plans and prunes; one prune at a time per process."""

    def __init__(self, settings: NodeSettings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.data_dir: Path = settings.storage.data_dir
        self.policy = policy_of(settings)
        self.lock = threading.Lock()

    def free_mb(self) -> float:
        return free_disk_mb(self.data_dir)

    def plan(self) -> list[retention.PruneAction]:
        return retention.plan(self.db, self.data_dir, self.policy, self.free_mb())

    def prune(self, actor: str) -> list[retention.PruneAction]:
        with self.lock:
            self._prune_prior_store(actor)
            return retention.execute(
                self.db,
                self.data_dir,
                self.plan(),
                actor=actor,
                free_mb=self.free_mb,
                target_mb=self.policy.free_space_target_mb,
            )

    def _prune_prior_store(self, actor: str) -> None:
        """Prior images fetched from PACS are a cache (PACS is asked again when a study needs
        one): they go at the received instances' age, counted from their fetch, and, when free
        disk is below the target, first of all (those fetched more than an hour ago: a batch
        may be using the newest)."""
        prune_prior_store(self.db, self.data_dir, self.policy.instances_days, actor)
        if self.free_mb() < self.policy.free_space_target_mb:
            prune_prior_store(self.db, self.data_dir, SPACE_PRIOR_AGE_DAYS, actor)

    def make_room(self) -> int:
        """The SCP's call when free disk is below its watermark."""
        pruned = self.prune("scp")
        if not pruned:
            log.error("free disk below the watermark and no settled study can be pruned")
        return len(pruned)


class RetentionLoop:
    def __init__(self, pruner: Pruner, interval_s: float) -> None:
        self.pruner = pruner
        self.loop = LoopThread(
            "retention", self._step, interval_s=interval_s, first_wait_s=5.0, log=log
        )

    @property
    def last_error(self) -> str | None:
        return self.loop.last_error

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop(timeout_s=30)

    def _step(self) -> float:
        self.pruner.prune("retention")
        return self.pruner.settings.retention.check_interval_s
