"""The UNet presets' synthetic weights look trained to a quantizer (ARCHITECTURE.md section 5), measured over real
runs of the pipeline's own scheduler (`exporter.models.unet_synthetic.measure_quantizer_view`): block inputs (the
residual stream read by every ResNet and transformer) grow >= 3x in range from the first to the last quarter of
the trajectory, and most Conv2d inputs have >= 1% of their channels at >= 20x the median channel's abs-max.

Measured (2 seed prompts, 10 DDIM steps, the preset's default length; `python -m pytest tests/test_unet_synthetic.py`):
median block-input growth 4.94x audioldm-mini, 4.26x tango-mini, 3.59x make-an-audio-mini (without the planted
timestep path: 1.52x on audioldm-mini); Conv2d layers with outlier channels 62% / 64% / 62%; the median quantized
layer's own input range grows only 1.24x / 0.82x / 0.91x (most read a GroupNorm or LayerNorm output, which the
growth does not pass)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.filterwarnings("ignore")
GROWTH_BOUND = 3.0          # the requirement; measured 3.59x .. 4.94x
CONV_OUTLIER_SHARE = 0.5    # measured 0.62 .. 0.64


@pytest.mark.parametrize("preset", ["audioldm-mini", pytest.param("tango-mini", marks=pytest.mark.slow),
                                    pytest.param("make-an-audio-mini", marks=pytest.mark.slow)])
def test_block_inputs_grow_over_the_trajectory_and_convs_have_outlier_channels(preset):
    import torch

    from calibration.prompts import select_prompts
    from exporter.models.unet_audio import load_unet_model
    from exporter.models.unet_layers import quantizable_unet_layers
    from exporter.models.unet_synthetic import measure_quantizer_view

    torch.set_num_threads(1)
    model = load_unet_model(preset, None, True, 0)
    view = measure_quantizer_view(model, dict(quantizable_unet_layers(model.unet)), select_prompts("seed", 2), steps=10)
    assert view["median_block_range_growth"] >= GROWTH_BOUND, view["median_block_range_growth"]
    assert view["conv_share_with_outliers"] >= CONV_OUTLIER_SHARE, view["conv_share_with_outliers"]
