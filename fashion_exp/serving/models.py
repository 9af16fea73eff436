"""The models the service serves: checked before they serve, loaded once, kept by the logged model
they are (at most max_models), each called in batches."""

from __future__ import annotations

import asyncio
import gc
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fashion_exp.core import preprocess
from fashion_exp.core.data import CLASSES
from fashion_exp.schemas import ServiceSettings as Settings
from fashion_exp.serving.batching import Batcher, Predict
from fashion_exp.tracking.logged_models import ModelRef

SIDE = preprocess.SIZE


class ModelUnusable(ValueError):
    """A logged model of the store that cannot be served: it does not take 28x28 images, or
    does not answer them with 10 class probabilities (`problem` says which; it names no
    file, so a client may read it)."""

    problem = "it is not a Keras model of (n, 28, 28) uint8 images"

    def __init__(self, uri: str, problem: str | None = None) -> None:
        self.problem = problem or self.problem
        self.reason = f"cannot be served: {self.problem}"
        super().__init__(f"model={uri!r} {self.reason}")


class StoreUnavailable(RuntimeError):
    """The tracking store did not answer a look-up (the request may be tried again)."""


# --- Checking a model before it serves ----------------------------------------------------------

PROBE_IMAGES = 4  # images a model answers before it may serve (a batch: rows must match)


def probe_images() -> np.ndarray:
    """What a model is asked before it serves: black, white, a gradient and fixed noise."""
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE))
    gradient = np.add.outer(np.arange(SIDE), np.arange(SIDE)) * 255 // (2 * SIDE - 2)
    return np.stack([np.zeros((SIDE, SIDE)), np.full((SIDE, SIDE), 255), gradient,
                     noise]).astype(np.uint8)


def graph_predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A Keras model as a function of (n, 28, 28) uint8 batches, traced once as a graph for
    every batch size (no retracing as batches grow and shrink)."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, SIDE, SIDE], tf.uint8)])
    def forward(images: tf.Tensor) -> tf.Tensor:
        return model(images, training=False)

    def predict(images: np.ndarray) -> np.ndarray:
        return forward(images).numpy()

    return predict


# --- Models loaded and kept --------------------------------------------------------------------

@dataclass
class ServedModel:
    """A loaded model with what /model reports about it."""

    ref: ModelRef
    run_name: str
    metrics: dict[str, float]
    predict: Predict
    batcher: Batcher | None = field(default=None, repr=False)
    run_url: str = ""  # the run's page in the MLflow UI

    def info(self, asked: ModelRef) -> dict[str, Any]:
        """The JSON of GET /model, for the reference a request asked with."""
        return {**ref_json(asked), "run_name": self.run_name, "metrics": self.metrics,
                "classes": list(CLASSES), "run_url": self.run_url}


def ref_json(ref: ModelRef) -> dict[str, Any]:
    """The reference as a request asked it, with the model it names."""
    return {"uri": ref.uri, "run_id": ref.run_id, "model_id": ref.model_id, "name": ref.name,
            "version": ref.version}


class Models:
    """The default model, plus others loaded on first request and kept: at most
    settings.max_models in all, the least recently used dropped first. Models are kept by
    the logged model a reference resolves to, so every spelling of one model loads it once."""

    def __init__(self, default: ServedModel, resolver: Callable[[str], ModelRef],
                 loader: Callable[[ModelRef], ServedModel], settings: Settings,
                 executor: ThreadPoolExecutor,
                 observe: Callable[[int], None] | None = None) -> None:
        self.default, self.resolver, self.loader = default, resolver, loader
        self.settings, self.executor, self.observe = settings, executor, observe
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()  # by logged model id
        self.lock = asyncio.Lock()
        self.reclaim: asyncio.TimerHandle | None = None  # the collection due after a drop
        self._attach(default)

    def _attach(self, model: ServedModel) -> ServedModel:
        model.batcher = Batcher(model.predict, self.executor, self.settings.max_batch,
                                self.observe)
        return model

    async def take(self, ref: ModelRef, loader: Callable[[ModelRef], ServedModel],
                   ) -> ServedModel:
        """The model `ref` names, for a swap: taken from the loaded ones if it is there,
        loaded otherwise (one load at a time, as for requests). Either way it is named by
        `ref` (the alias followed), not by the reference a request loaded it with."""
        async with self.lock:
            if ref.model_id in self.loaded:
                return replace(self.loaded.pop(ref.model_id), ref=ref)
            return await asyncio.to_thread(loader, ref)

    def swap(self, new: ServedModel) -> ServedModel:
        """Serve `new` by default from the next request on. The old default answers the
        requests that already took it and stays loaded, as the most recently used, for
        requests that name it (unless max_models is 1). Returns the old default."""
        old, self.default = self.default, new if new.batcher else self._attach(new)
        self.loaded[old.ref.model_id] = old
        while len(self.loaded) > self.settings.max_models - 1:  # the default counts as one
            self._drop(self.loaded.popitem(last=False)[1])
        return old

    def _drop(self, model: ServedModel) -> None:
        """Stop a model that leaves memory. Models may have been frozen out of the garbage
        collector's reach (cli/serve.py, following.py): once its worker has ended, one full
        collection (a pause of ~0.3 s, only when a model is dropped) reclaims it."""
        model.batcher.close()
        loop = asyncio.get_running_loop()
        # One collection for all the models dropped meanwhile (with max_models=1, every
        # request naming another model drops one).
        if gc.get_freeze_count() and (self.reclaim is None or self.reclaim.when() <= loop.time()):
            self.reclaim = loop.call_later(RECLAIM_AFTER_SECONDS, reclaim_frozen)

    async def get(self, uri: str | None) -> tuple[ModelRef, ServedModel]:
        """The reference and model for a request's `model` parameter (None: the default);
        UnknownModel when the store has no such model."""
        if uri is None or uri == "" or uri == self.default.ref.uri:
            return self.default.ref, self.default
        ref = await asyncio.to_thread(self.resolver, uri)
        if ref.model_id == self.default.ref.model_id:
            return ref, self.default
        async with self.lock:  # one load at a time; a second request for it waits here
            if ref.model_id not in self.loaded:
                model = self._attach(await asyncio.to_thread(self.loader, ref))
                if self.settings.max_models == 1:
                    # Only the default is kept: this model answers the request that named it
                    # (a closed batcher still answers what it is given) and leaves memory.
                    self._drop(model)
                    return ref, model
                self.loaded[ref.model_id] = model
                # The default counts as one; the model just loaded always stays.
                while len(self.loaded) > self.settings.max_models - 1:
                    self._drop(self.loaded.popitem(last=False)[1])
            self.loaded.move_to_end(ref.model_id)
            return ref, self.loaded[ref.model_id]

    def close(self) -> None:
        """Stop every model's batching worker (the service is shutting down)."""
        for model in (self.default, *self.loaded.values()):
            model.batcher.close()


RECLAIM_AFTER_SECONDS = 5.0  # after a model is dropped: its last requests are answered by then


def reclaim_frozen() -> None:
    """Collect garbage among frozen objects too, then freeze what lives on."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()

