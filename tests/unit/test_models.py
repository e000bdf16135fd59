"""The networks of dtrain.models: shapes, sizes, determinism, gradients, causality, errors."""

import pytest
import torch
import torch.nn.functional as F

from dtrain.config import MODELS, ModelConfig
from dtrain.data import DataInfo
from dtrain.errors import UserError
from dtrain.models import MODEL_KIND, build_model, num_parameters

IMAGE_MODELS = [n for n in MODELS if MODEL_KIND[n] == "image"]
LM_MODELS = [n for n in MODELS if MODEL_KIND[n] == "lm"]
SMALL_IMAGE_MODELS = ["digits_cnn", "mlp", "resnet20", "mobilenet"]


def image_info(shape=(3, 32, 32), classes=10, name="synthetic"):
    return DataInfo(
        kind="image",
        in_shape=shape,
        num_classes=classes,
        vocab_size=0,
        seq_len=0,
        train_size=100,
        test_size=10,
        metric="accuracy",
        name=name,
    )


def lm_info(vocab=30, seq_len=16):
    return DataInfo(
        kind="lm",
        in_shape=(seq_len,),
        num_classes=vocab,
        vocab_size=vocab,
        seq_len=seq_len,
        train_size=100,
        test_size=10,
        metric="perplexity",
        name="text",
    )


def build(name, info, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, **kw), info)


def batch(info, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    if info.kind == "lm":
        x = torch.randint(0, info.vocab_size, (n, info.seq_len), generator=g)
        y = torch.randint(0, info.vocab_size, (n, info.seq_len), generator=g)
    else:
        x = torch.randn(n, *info.in_shape, generator=g)
        y = torch.randint(0, info.num_classes, (n,), generator=g)
    return x, y


def loss_of(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_model_kind_names_every_model():
    assert set(MODEL_KIND) == set(MODELS)
    assert set(MODEL_KIND.values()) == {"image", "lm"}


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (2, 12, 9)])
def test_image_output_shape(name, shape):
    if name == "resnet18" and shape == (3, 32, 32):
        shape = (3, 16, 16)  # same code path, a quarter of the work
    info = image_info(shape, classes=7)
    x, _ = batch(info, n=3)
    assert build(name, info)(x).shape == (3, 7)


def test_mlp_takes_any_shape():
    info = image_info((20,), classes=3)
    assert build("mlp", info)(torch.randn(5, 20)).shape == (5, 3)


@pytest.mark.parametrize("name", LM_MODELS)
def test_lm_output_shape_and_shorter_sequences(name):
    info = lm_info(vocab=30, seq_len=16)
    model = build(name, info)
    assert model(torch.randint(0, 30, (2, 16))).shape == (2, 16, 30)
    assert model(torch.randint(0, 30, (2, 5))).shape == (2, 5, 30)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet20", 0.27e6), ("resnet18", 11.17e6), ("mobilenet", 3.2e6), ("digits_cnn", 72e3)],
)
def test_parameter_count(name, expected):
    n = num_parameters(build(name, image_info()))
    assert abs(n - expected) / expected < 0.03, n


def test_width_and_depth_knobs():
    info = image_info()
    assert num_parameters(build("resnet20", info, width=32)) > 3.5 * 0.27e6
    assert num_parameters(build("mobilenet", info, width=16)) < 0.3 * 3.2e6
    mlp = build("mlp", image_info((10,)), width=7, depth=3)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [
        7,
        7,
        7,
        10,
    ]
    lm = lm_info()
    assert len(build("char_transformer", lm, depth=3).blocks) == 3
    lstm = build("lstm_lm", lm, width=32, depth=3).lstm
    assert (lstm.hidden_size, lstm.num_layers) == (32, 3)


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_weights(name):
    info = lm_info() if MODEL_KIND[name] == "lm" else image_info()
    kw = {"width": 16} if name == "resnet18" else {}
    a, b = build(name, info, seed=3, **kw), build(name, info, seed=3, **kw)
    c = build(name, info, seed=4, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", [*SMALL_IMAGE_MODELS, *LM_MODELS])
def test_backward_and_one_sgd_step_lowers_the_loss(name):
    info = lm_info() if MODEL_KIND[name] == "lm" else image_info((3, 8, 8))
    model = build(name, info)
    x, y = batch(info, n=8)
    loss = loss_of(model, x, y)
    loss.backward()
    params = list(model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0
    with torch.no_grad():
        for p in params:
            p -= 0.02 * p.grad
    assert loss_of(model, x, y).item() < loss.item()


def test_resnet18_backward():
    info = image_info((3, 8, 8))
    model = build("resnet18", info)
    x, y = batch(info, n=2)
    loss_of(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", LM_MODELS)
def test_lm_is_causal(name):
    info = lm_info(vocab=30, seq_len=16)
    model = build(name, info).eval()
    x = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(0))
    t = 9
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 1) % 30
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("name", LM_MODELS)
def test_lm_forward_is_deterministic(name):
    info = lm_info()
    model = build(name, info).eval()
    x, _ = batch(info)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_model_on_text_is_a_user_error(name):
    with pytest.raises(UserError, match=rf"'{name}' is an image classifier.*char_transformer"):
        build(name, lm_info())


@pytest.mark.parametrize("name", LM_MODELS)
def test_lm_on_images_is_a_user_error(name):
    with pytest.raises(UserError, match=r"language model but data.name = 'synthetic'.*resnet20"):
        build(name, image_info())


def test_cnn_on_flat_inputs_and_unused_knobs_are_user_errors():
    with pytest.raises(UserError, match=r"\[C, H, W\].*model.name = mlp"):
        build("resnet20", image_info((20,)))
    with pytest.raises(UserError, match=r"model\.depth"):
        build("resnet20", image_info(), depth=5)
    with pytest.raises(UserError, match=r"model\.dropout"):
        build("digits_cnn", image_info(), dropout=0.1)
    with pytest.raises(UserError, match=r"divisible by model\.heads"):
        build("char_transformer", lm_info(), width=30, heads=4)
