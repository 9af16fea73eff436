"""A registry alias followed while serving: `model_uri=models:/<name>@<alias>` keeps serving
whichever version the alias points at.

Every `every` seconds the alias is looked up in the store. When it names another logged model,
that model is loaded and warmed off the event loop while the old one keeps answering, then
swapped in at once (`Models.swap`): each request is answered whole by the model it started
with, and its answer names that model's version. A version that cannot be loaded, or a store
that does not answer, leaves the old model serving; the problem is logged once, counted in
/metrics and shown by /model until the next successful check.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from fashion_exp.tracking.logged_models import ModelRef


class ServedModel(Protocol):
    """A loaded model (models.ServedModel), as far as following needs it."""

    ref: ModelRef


class Models(Protocol):
    """The service's models (models.Models), as far as following needs them."""

    default: ServedModel

    async def take(self, ref: ModelRef, loader: Callable[[ModelRef], Any]) -> ServedModel:
        """The model `ref` names: a loaded copy or a new load."""

    def swap(self, new: Any) -> ServedModel:
        """Serve `new` by default; returns the old default."""

log = logging.getLogger(__name__)


class AliasFollower:
    """Keeps `models.default` on the logged model that alias URI `uri` names."""

    def __init__(self, models: Models, uri: str, resolve: Callable[[str], ModelRef],
                 load: Callable[[ModelRef], ServedModel], every: float,
                 permanent: tuple[type[Exception], ...] = (),
                 on_swap: Callable[[ServedModel], None] | None = None) -> None:
        """`permanent`: load failures not worth trying at every check (tried again after
        retry_refused seconds); other failures (the store, a download) are tried again at
        the next check."""
        self.models, self.uri, self.resolve, self.load = models, uri, resolve, load
        self.every, self.permanent, self.on_swap = every, permanent, on_swap
        self.checked_at: float | None = None  # time.time() of the last look-up that answered
        self.problem: str | None = None  # why the alias's current target is not served
        # The model id that failed to load, why, and when it may be tried again.
        self.refused: tuple[str, str, float] | None = None

    def status(self) -> dict[str, Any]:
        """What /model reports about the alias being followed."""
        return {"uri": self.uri, "every_seconds": self.every, "checked_at": self.checked_at,
                "problem": self.problem}

    async def run(self) -> None:
        """Check every `every` seconds until cancelled; an unexpected error is reported and
        the next check comes as usual (following never stops by itself)."""
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.check()
            except Exception as err:  # noqa: BLE001 - keep following; the old model serves
                log.exception("checking %s failed", self.uri)
                self.problem = f"checking {self.uri} failed: {type(err).__name__}: {err}"

    async def check(self) -> bool:
        """Look the alias up once; swap to the model it names if that is new and loads.
        True when a swap happened."""
        try:
            ref = await asyncio.to_thread(self.resolve, self.uri)
        except Exception as err:  # noqa: BLE001 - an alias deleted or a store down: keep serving
            self._report(f"{self.uri} could not be looked up ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}); still serving "
                         f"{self._serving()}")
            return False
        self.checked_at = time.time()
        if ref.model_id == self.models.default.ref.model_id:
            self.problem = self.refused = None  # the alias names the model being served
            return False
        if self.refused and ref.model_id == self.refused[0] and time.time() < self.refused[2]:
            self._report(self.refused[1])
            return False
        started = time.perf_counter()
        try:
            new = await self.models.take(ref, self.load)
        except Exception as err:  # noqa: BLE001 - whatever it is, the old model keeps serving
            # A refused model says what is wrong with it (models.ModelUnusable.problem).
            why = getattr(err, "problem", None) or type(err).__name__
            problem = (f"{self.uri} now names version {ref.version} ({ref.model_id}), which "
                       f"cannot be served ({why}); still serving {self._serving()}")
            if isinstance(err, self.permanent):  # e.g. not a model of 28x28 images (or its
                # files are missing): tried again only after a while, not at every check
                self.refused = (ref.model_id, problem, time.time() + self.retry_refused())
            self._report(problem)  # anything else (the store, a download) is tried again
            return False
        old = self.models.swap(new)
        self.problem = self.refused = None
        # The model loaded at start-up was frozen out of the garbage collector's reach
        # (cli/serve.py); freeze the new one too, or every full collection walks its objects
        # (a pause of ~0.3 s: the p99 under load during a swap went from 13 ms to 290 ms).
        if gc.get_freeze_count():
            gc.freeze()
        log.info("%s moved: now serving version %s (%s), loaded and warmed in %.1f s, in "
                 "place of version %s", self.uri, ref.version, ref.model_id,
                 time.perf_counter() - started, old.ref.version)
        if self.on_swap:
            self.on_swap(new)
        return True

    def retry_refused(self) -> float:
        """Seconds before a model refused as unusable is loaded again (its files may be
        restored): ten checks, at least a minute."""
        return max(60.0, 10 * self.every)

    def _serving(self) -> str:
        ref = self.models.default.ref
        return f"version {ref.version} ({ref.model_id})"

    def _report(self, problem: str) -> None:
        if problem != self.problem:  # once per problem, not once per check
            log.warning("%s", problem)
        self.problem = problem
