"""quadit calibration: activation statistics of any nn.Module through a caller-supplied forward loop.

Imports nothing else of quadit (ARCHITECTURE.md section 2).
"""
