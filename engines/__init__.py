"""quadit engines: running, calibrating, evaluating and serving exports, and the command line.

Rooms (each `__init__` says what it may import): `runtime` <- `calibrate` <- `evaluation`; `runtime` <- `serving`;
`cli` on top. Imports point one way: scripts -> engines -> exporter -> calibration.
"""
