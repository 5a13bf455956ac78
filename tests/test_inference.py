"""inference.py: the shared trained model really finds the atrium of held-out phantoms, a locator
that finds nothing falls back to the volume's centre (and says so), mirror test-time
augmentation is the mean over the W flip, the mask's largest component is 26-connected, and a
checkpoint is validated before anything runs."""
import os

import numpy as np
import pytest
import torch

import dataset as ds
import inference
import predict
from conftest import run_main
from metrics import dice
from utils import UserError


def test_trained_run_finds_the_atrium_of_held_out_phantoms(trained_run, tiny_data):
    """The model every prediction test uses: if it predicted empty masks, or masks beside the
    atrium, the tests that check masks on the atrium would check nothing."""
    pipe = inference.load_two_stage(trained_run / "locator" / "best.pt", trained_run / "segmenter" / "best.pt",
                                    torch.device("cpu"))
    scores = []
    for case in ds.find_cases(tiny_data, require_labels=True):
        image, label, props = ds.load_case(case)
        prob, location = inference.predict_two_stage(pipe, image, props)
        mask = inference.to_mask(prob)
        assert location.found and mask.any(), case.case_id
        centre = np.array(ds.box_centre(ds.bounding_box(label)))
        assert np.abs(np.array(location.centre) - centre).max() < 8, (location.centre, centre)  # voxels
        scores.append(dice(mask, label))
    assert min(scores) > 0.3 and np.mean(scores) > 0.5, scores


def test_a_locator_that_finds_nothing_crops_at_the_volume_centre_and_says_so(trained_run, tiny_data, tmp_path):
    blind = torch.load(trained_run / "locator" / "best.pt", weights_only=True)
    blind["model"]["output.bias"] = torch.full_like(blind["model"]["output.bias"], -1e4)
    torch.save(blind, tmp_path / "blind.pt")
    case = ds.find_cases(tiny_data, require_labels=True)[0]
    pipe = inference.load_two_stage(tmp_path / "blind.pt", trained_run / "segmenter" / "best.pt", torch.device("cpu"))
    image, _, props = ds.load_case(case)
    _, location = inference.predict_two_stage(pipe, image, props)
    assert not location.found and location.centre == tuple((s - 1) / 2 for s in image.shape)
    run = run_main(predict.main, "--input", case.image, "--output_dir", tmp_path / "out", "--device", "cpu",
                   "--locator_path", tmp_path / "blind.pt", "--segmenter_path", trained_run / "segmenter" / "best.pt")
    assert run.returncode == 0 and "the locator found nothing; cropped at the volume centre" in run.stderr


def test_probabilities_with_tta_are_the_mean_over_the_w_flip():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 1, 3, padding=1).eval()
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    cpu = torch.device("cpu")
    mirrored = inference.probabilities(model, x[..., ::-1], cpu)[..., ::-1]
    expected = (inference.probabilities(model, x, cpu) + mirrored) / 2
    np.testing.assert_allclose(inference.probabilities(model, x, cpu, tta=True), expected, atol=1e-6)
    np.testing.assert_allclose(inference.probabilities(model, x, cpu),
                               torch.sigmoid(model(torch.from_numpy(x)[None, None]))[0, 0].detach().numpy(), atol=1e-6)


def test_to_mask_thresholds_at_one_half_and_keeps_the_26_connected_largest_component():
    prob = np.zeros((6, 8, 8), np.float32)
    prob[1:4, 1:4, 1:4] = 0.9      # the body, 27 voxels
    prob[4, 4, 4] = 0.5            # touches the body at a corner only, exactly at the threshold: kept
    prob[1, 6:8, 6:8] = 0.7        # a separate 4-voxel island: dropped
    prob[5, 0, 0] = 0.49           # below the threshold
    mask = inference.to_mask(prob, largest_component=True)
    expected = np.zeros(prob.shape, np.uint8)
    expected[1:4, 1:4, 1:4] = expected[4, 4, 4] = 1
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == np.uint8
    assert inference.to_mask(prob).sum() == 27 + 1 + 4
    assert not inference.to_mask(np.zeros((3, 3, 3)), largest_component=True).any()


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_load_checkpoint_refuses_pickled_code_other_roles_and_other_files(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "la-seg-v1", "model": {}, "config": {"role": "segmenter"}, "x": Exploit()}, evil)
    with pytest.raises(UserError, match="evil.pt: not a readable checkpoint"):
        inference.load_checkpoint(evil, "segmenter", "--segmenter_path")
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(UserError, match="holds a locator model, expected the segmenter"):
        inference.load_checkpoint(trained_run / "locator" / "best.pt", "segmenter", "--segmenter_path")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="--locator_path .*plain.pt: not a checkpoint written by"):
        inference.load_checkpoint(tmp_path / "plain.pt", "locator", "--locator_path")
    ckpt = inference.load_checkpoint(trained_run / "segmenter" / "best.pt", "segmenter")
    ckpt["model"].pop("output.bias")
    with pytest.raises(UserError, match="do not fit the architecture"):
        inference.load_model(ckpt, "seg.pt", torch.device("cpu"))


def test_load_two_stage_refuses_checkpoints_of_two_spacings(trained_run, tmp_path):
    other = torch.load(trained_run / "segmenter" / "best.pt", weights_only=True)
    other["config"]["spacing"] = [1.25, 1.25, 1.25]
    torch.save(other, tmp_path / "seg.pt")
    with pytest.raises(UserError, match="different spacings"):
        inference.load_two_stage(trained_run / "locator" / "best.pt", tmp_path / "seg.pt", torch.device("cpu"))


class Identity(torch.nn.Module):
    """An identity-like model: a 1x1x1 convolution with the identity matrix as weights."""
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv3d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("shape, window, overlap", [
    ((2, 37, 50, 23), (16, 32, 32), 0.5),   # uneven, and W shorter than its window
    ((1, 20, 41, 33), (8, 16, 16), 0.25),
    ((3, 16, 16, 16), (16, 16, 16), 0.5),   # one window
    ((1, 19, 30, 45), (8, 8, 8), 0.0),      # windows that only touch
])
def test_sliding_window_with_an_identity_model_reproduces_its_input(shape, window, overlap):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = inference.sliding_window([Identity(shape[0])], volume, window, torch.device("cpu"), overlap=overlap,
                                   batch_size=3)
    assert out.shape == volume.shape and out.dtype == np.float32
    assert np.abs(out - volume).max() < 1e-6


def test_sliding_window_batches_models_and_activation_agree():
    volume = np.random.default_rng(1).normal(size=(2, 21, 35, 30)).astype(np.float32)
    cpu, model = torch.device("cpu"), Identity(2)
    one = inference.sliding_window([model], volume, (16, 16, 16), cpu, batch_size=1, activation=torch.sigmoid)
    many = inference.sliding_window([model, model], volume, (16, 16, 16), cpu, batch_size=5,
                                    activation=torch.sigmoid)
    np.testing.assert_allclose(one, many, atol=1e-6)
    np.testing.assert_allclose(one, 1 / (1 + np.exp(-volume)), atol=1e-6)


def test_gaussian_weights_and_window_starts_by_hand():
    w = inference.gaussian_weights((16, 8, 33))
    assert w.shape == (16, 8, 33) and w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[16 - 1 - 3, 4, 16] == pytest.approx(w[3, 4, 16])  # symmetric about the centre
    # Along an odd axis the centre voxel is the peak; one sigma (33 / 8 voxels) away it falls by exp(-1/2).
    line = inference.gaussian_weights((33,))
    assert line[16] == 1.0
    x = np.arange(33) - 16
    np.testing.assert_allclose(line, np.exp(-0.5 * (x / (33 / 8)) ** 2), rtol=1e-6)
    assert inference.window_starts(10, 16, 0.5) == [0]
    assert inference.window_starts(64, 32, 0.5) == [0, 16, 32]
    starts = inference.window_starts(100, 32, 0.5)  # 68 voxels to cover in steps of at most 16
    assert starts[0] == 0 and starts[-1] == 68 and max(np.diff(starts)) <= 16 and len(starts) == 6
    with pytest.raises(ValueError, match="overlap"):
        inference.sliding_window([Identity(1)], np.zeros((1, 8, 8, 8), np.float32), (8, 8, 8),
                                 torch.device("cpu"), overlap=1.0)
