"""Serving `quadit_generate`: Triton (PyTriton) server, scheduler, batching, a Triton model repository.

- `server.py`: the model binding, the serve loop that drains on SIGTERM;
- `api.py`: the request API (inputs, parsing and validation per family, `RequestError`);
- `families.py`: what differs between a Stable Audio Open and a UNet-family export (parse, batch key, batched run);
- `handshake.py`: a patient PyTriton instance handshake, copied into the model store for the stubs (so that
  loading the model at tritonserver start-up, what makes `/v2/health/ready` honest, cannot race);
- `scheduler.py`, `batching.py`, `unet_batching.py`: admission, time limits and the batched samplers (DiT, UNet);
- `triton_repo.py`, `triton_bls.py`, `triton_bls_unet.py`, `triton_ort_model.py`: a model repository for a stock
  `tritonserver`;
- `load_test.py`: the loopback load test (JSON + Markdown + PNG).

May import: `engines.runtime`, `exporter`, `calibration`. Never `engines.evaluation` or `engines.cli`.
"""
