"""Tests for the CIFAR ResNets and Wide ResNets registered with timm."""

import pytest
import timm
import torch
from torch import nn

import gctkd.models  # noqa: F401  (registers the models)
from gctkd.errors import UserError
from gctkd.models.cifar import CIFAR_MEAN, CIFAR_STD

MODEL_NAMES = ['resnet8x4', 'resnet32x4', 'resnet20', 'resnet56', 'wrn_16_2', 'wrn_40_2']

# measured; the CRD paper (Tian et al., 2020) gives 1.23M, 7.43M, 0.28M, 0.86M, 0.70M, 2.26M
PARAM_COUNTS = [
    ('resnet8x4', 100, 1_233_540),
    ('resnet8x4', 10, 1_210_410),
    ('resnet32x4', 100, 7_433_860),
    ('resnet32x4', 10, 7_410_730),
    ('resnet20', 100, 278_324),
    ('resnet20', 10, 272_474),
    ('resnet56', 100, 861_620),
    ('resnet56', 10, 855_770),
    ('wrn_16_2', 100, 703_284),
    ('wrn_16_2', 10, 691_674),
    ('wrn_40_2', 100, 2_255_156),
    ('wrn_40_2', 10, 2_243_546),
]

# name -> channels of the taps: stem, stage 1, stage 2, stage 3
TAP_CHANNELS = {
    'resnet8x4': [32, 64, 128, 256],
    'resnet32x4': [32, 64, 128, 256],
    'resnet20': [16, 16, 32, 64],
    'resnet56': [16, 16, 32, 64],
    'wrn_16_2': [16, 32, 64, 128],
    'wrn_40_2': [16, 32, 64, 128],
}
TAP_SIZES = [32, 32, 16, 8]


def _images(batch_size: int = 2) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_registered_with_cifar_cfg(name):
    assert timm.is_model(name)
    assert name in timm.list_models(module='cifar')
    assert name not in timm.list_models(pretrained=True)
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.input_size == (3, 32, 32)
    assert cfg.mean == CIFAR_MEAN == (0.4914, 0.4822, 0.4465)
    assert cfg.std == CIFAR_STD == (0.2470, 0.2435, 0.2616)
    assert cfg.num_classes == 100
    assert not cfg.has_weights

    model = timm.create_model(name)
    first_conv = model.get_submodule(cfg.first_conv)
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert model.get_submodule(cfg.classifier) is model.get_classifier()
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)


@pytest.mark.parametrize('name,num_classes,expected', PARAM_COUNTS)
def test_param_count(name, num_classes, expected):
    model = timm.create_model(name, num_classes=num_classes)
    assert model.num_classes == num_classes
    assert _count_params(model) == expected


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_output_shapes(name):
    model = timm.create_model(name, num_classes=10).eval()
    num_features = TAP_CHANNELS[name][-1]
    assert model.num_features == num_features
    with torch.no_grad():
        features = model.forward_features(_images())
        assert features.shape == (2, num_features, 8, 8)
        assert model.forward_head(features, pre_logits=True).shape == (2, num_features)
        assert model.forward_head(features).shape == (2, 10)
        assert model(_images()).shape == (2, 10)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_forward_intermediates_match_feature_info(name):
    model = timm.create_model(name).eval()
    info = model.feature_info
    assert [f['num_chs'] for f in info] == TAP_CHANNELS[name]
    assert [f['reduction'] for f in info] == [1, 1, 2, 4]
    for f in info:
        model.get_submodule(f['module'])  # every tap names a real module

    with torch.no_grad():
        final, taps = model.forward_intermediates(_images())
        expected = [(2, f['num_chs'], 32 // f['reduction'], 32 // f['reduction']) for f in info]
        assert [tuple(t.shape) for t in taps] == expected
        assert [t.shape[-1] for t in taps] == TAP_SIZES
        torch.testing.assert_close(final, model.forward_features(_images()))


def test_forward_intermediates_indices():
    model = timm.create_model('resnet20').eval()
    with torch.no_grad():
        _, all_taps = model.forward_intermediates(_images())
        last_two = model.forward_intermediates(_images(), indices=2, intermediates_only=True)
        chosen = model.forward_intermediates(_images(), indices=[0, -1], intermediates_only=True)
        final, early = model.forward_intermediates(_images(), indices=[1], stop_early=True)
    assert [t.shape[1] for t in last_two] == [32, 64]
    torch.testing.assert_close(last_two[1], all_taps[3])
    assert len(chosen) == 2
    torch.testing.assert_close(chosen[0], all_taps[0])
    torch.testing.assert_close(chosen[1], all_taps[3])
    assert len(early) == 1 and final.shape == (2, 16, 32, 32)
    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(_images(), output_fmt='NHWC')


def test_wrn_last_tap_is_before_final_bn_relu():
    model = timm.create_model('wrn_16_2').eval()
    with torch.no_grad():
        final, taps = model.forward_intermediates(_images())
        normed = model.forward_intermediates(_images(), norm=True, intermediates_only=True)
    assert (taps[-1] < 0).any()  # a residual sum, not yet through a ReLU
    torch.testing.assert_close(normed[-1], final)
    torch.testing.assert_close(normed[-1], torch.relu(model.norm(taps[-1])))
    torch.testing.assert_close(normed[2], taps[2])


def test_prune_intermediate_layers():
    model = timm.create_model('resnet8x4').eval()
    kept = model.prune_intermediate_layers(indices=[0, 2])
    assert kept == [0, 2]
    assert len(model.stages) == 2
    assert model.num_features == 128 and model.num_classes == 0
    with torch.no_grad():
        final, taps = model.forward_intermediates(_images(), indices=[0, 2])
    assert [tuple(t.shape) for t in taps] == [(2, 32, 32, 32), (2, 128, 16, 16)]
    assert final.shape == (2, 128, 16, 16)


@pytest.mark.parametrize('name', ['resnet20', 'wrn_16_2'])
def test_reset_classifier(name):
    model = timm.create_model(name, num_classes=10).eval()
    num_features = model.num_features
    model.reset_classifier(7)
    assert model.num_classes == 7
    assert isinstance(model.get_classifier(), nn.Linear)
    assert model.get_classifier().out_features == 7
    with torch.no_grad():
        assert model(_images()).shape == (2, 7)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity)
        assert model(_images()).shape == (2, num_features)
        model.reset_classifier(0, global_pool='')
        assert model(_images()).shape == (2, num_features, 8, 8)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_pretrained_raises(name):
    with pytest.raises(UserError, match='no pretrained weights exist'):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize('name', ['resnet8x4', 'wrn_16_2'])
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    channels = TAP_CHANNELS[name]
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == [1, 1, 2, 4]
    with torch.no_grad():
        maps = model(_images())
    assert [tuple(m.shape) for m in maps] == [(2, c, s, s) for c, s in zip(channels, TAP_SIZES)]

    picked = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert picked.feature_info.channels() == [channels[1], channels[3]]


def test_features_only_matches_forward_intermediates():
    torch.manual_seed(0)
    model = timm.create_model('wrn_16_2').eval()
    torch.manual_seed(0)  # same initialization: the extractor renames the modules it keeps
    extractor = timm.create_model('wrn_16_2', features_only=True).eval()
    with torch.no_grad():
        taps = model.forward_intermediates(_images(), intermediates_only=True)
        maps = extractor(_images())
    for tap, feature_map in zip(taps, maps):
        torch.testing.assert_close(tap, feature_map)


@pytest.mark.parametrize('name', ['resnet20', 'wrn_16_2'])
def test_channels_last(name):
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        expected = model(_images())
        model = model.to(memory_format=torch.channels_last)
        actual = model(_images().to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_same_output():
    model = timm.create_model('resnet20', num_classes=10).eval()
    expected = model(_images())
    model.set_grad_checkpointing()
    actual = model(_images())
    actual.sum().backward()
    torch.testing.assert_close(actual, expected)
    assert model.stem[0].weight.grad is not None


def test_pretrained_download_failure_is_a_user_error(monkeypatch):
    """Offline, timm (through huggingface_hub) raises its own errors; gctkd says what to do."""
    from gctkd.models import create_model

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError) as caught:
        create_model("resnet18", 10, pretrained=True)
    assert str(caught.value) == (
        "cannot load timm's pretrained weights for 'resnet18' (OSError: We couldn't connect to "
        "'https://huggingface.co'): check the network or the Hugging Face cache, or drop "
        "--pretrained"
    )
