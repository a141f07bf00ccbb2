"""Prometheus metrics of the service, in a registry of its own (one per app, so tests stay apart)."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "faceopt_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "faceopt_request_seconds",
            "request latency by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.images = Histogram(
            "faceopt_images_per_request",
            "images in each /predict request",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )

        # What the model answers, the first thing to watch for drift: label values are bounded
        # (the version's classes), so the series stay few.
        self.predicted = Counter(
            "faceopt_predictions_total",
            "answered faces by head and predicted class",
            ["version", "head", "label"],
            registry=self.registry,
        )
        self.confidence = Histogram(
            "faceopt_prediction_confidence",
            "the winning class's calibrated probability, by head",
            ["version", "head"],
            buckets=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
            registry=self.registry,
        )
        self.no_face = Counter(
            "faceopt_no_face_total",
            "uploaded photos in which no face was found (no answer)",
            ["version"],
            registry=self.registry,
        )

    def observe(self, version: str, probs: dict[str, np.ndarray] | None, classes: dict) -> None:
        """One photo's answer: its class and winning probability per head, or no face."""
        if probs is None:
            self.no_face.labels(version).inc()
            return
        for head, p in probs.items():
            self.predicted.labels(version, head, classes[head][int(p.argmax())]).inc()
            self.confidence.labels(version, head).observe(float(p.max()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
