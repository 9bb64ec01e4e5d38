"""fanny-sim: a scenario simulator that knows the truth (issue 6, point 5).

K devices run the real engine (headless, real aiortc over loopback) against a real broker, each
following a track (GPX 1.1 or a generated walk) seen through a GPS noise model. The true contacts
come from the noise-free tracks; the detected ones from the devices' token stores.

Modules: :mod:`.scenario` (TOML + GPX loading), :mod:`.tracks` (noise, outliers, fix losses and
the replaying position source), :mod:`.truth` (true contacts), :mod:`.metrics` (precision,
recall, latency), :mod:`.runner` (broker + engines), :mod:`.cli` (``fanny-sim``).
"""
