"""fpn-serve's HTTP service: adaptive-depth predictions from implicit-depth checkpoints.

Layers (as SeldonIO/MLServer): ``routes_v1`` / ``routes_v2`` speak HTTP; ``handlers`` does the
work without framework types; ``runtime`` holds the models, each with a ``batcher`` and a
backend from ``backends``. :func:`service.app.create_app` builds the app; ``fpn-serve`` runs it.
Imports ``models``, never ``training``.
"""

__version__ = "0.1.0"
