"""Token2Wav DiT: parity with transformers through our loader (velocity field with and without guidance, ECAPA, one
solver step, whole sampling), attention paths, padding, block masks and receptive field, solvers' order, the sway
schedule, an overfit run, and bad input."""
import math

import pytest
import torch

from nano_omni.attention import use_backend
from nano_omni.checkpoint import load_weights
from nano_omni.config import DiTConfig, get_config
from nano_omni.dit import (DiT, euler_step, flow_matching_loss, integrate, receptive_field, rk4_step,
                           sway_schedule)
from reference import hf_dit

CFG = get_config("tiny").dit
PREFIX = "token2wav.code2wav_dit_model."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matrices are too small for intra-op threads to pay; on a busy 2-core machine their spin-waits
    made the overfit test 15x slower (64 s vs 3.6 s measured). One thread here, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair():
    hf = hf_dit(CFG, seed=1)
    ours = DiT(CFG).eval()
    load_weights(ours, {PREFIX + k: v for k, v in hf.state_dict().items()}, prefix=PREFIX,
                 source="transformers DiT")
    return hf, ours


def _inputs(B=2, N=30, T_ref=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, CFG.num_embeds + 1, (B, N), generator=g)
    cond = torch.randn(B, CFG.enc_emb_dim, generator=g)
    ref_mel = torch.randn(B, T_ref, CFG.mel_dim, generator=g)
    x = torch.randn(B, N * CFG.repeats, CFG.mel_dim, generator=g)
    t = torch.rand(B, generator=g)
    return codes, cond, ref_mel, x, t


def _hf_velocity(hf, x, t, codes, cond, ref_mel, guidance):
    """The right-hand side that transformers' sample() integrates (its closure `ode_function`, spelled out)."""
    spk = cond[:, None].expand(-1, x.shape[1], -1)   # the reference takes the x-vector already broadcast over T
    if guidance == 0:
        return hf(hidden_states=x, condition_vector=ref_mel, speaker_embedding=spk, quantized_code=codes,
                  time_step=t, apply_cfg=False)
    v_c, v_u = hf(hidden_states=x, condition_vector=ref_mel, speaker_embedding=spk, quantized_code=codes,
                  time_step=t, apply_cfg=True).chunk(2)
    return v_c + (v_c - v_u) * guidance


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers.
# ----------------------------------------------------------------------------------------------------------------
def test_module_names_and_shapes_equal_the_official_model():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavDiTModel
    from reference import hf_dit_config

    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in Qwen2_5OmniToken2WavDiTModel(hf_dit_config(DiTConfig())).state_dict().items()}
        own = {k: tuple(v.shape) for k, v in DiT(DiTConfig()).state_dict().items()}
    assert own == ref and len(own) == 359   # 359 keys under token2wav.code2wav_dit_model. in the 7B checkpoint


@pytest.mark.parametrize("backend", ["manual", "fused"])
@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_velocity_matches_transformers(pair, backend, guidance):
    hf, ours = pair
    codes, cond, ref_mel, x, t = _inputs(B=3, N=40)            # 80 frames = 3.3 blocks of 24: a partial last block
    with torch.no_grad(), use_backend(backend):
        want = _hf_velocity(hf, x, t, codes, cond, ref_mel, guidance)
        got = ours.velocity(x, t, ours.prepare(codes, cond, ref_mel, guided=guidance > 0), guidance)
    assert want.abs().mean() > 0.1                              # a field worth comparing, not a near-zero one
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_forward_is_the_conditional_velocity(pair):
    hf, ours = pair
    codes, cond, ref_mel, x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, codes, cond, ref_mel), _hf_velocity(hf, x, t, codes, cond, ref_mel, 0.0),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("T_ref", [5, 33])                       # 5 = the shortest a reflect-padded ECAPA accepts
def test_ecapa_matches_transformers(pair, T_ref):
    hf, ours = pair
    ref_mel = _inputs(B=3, T_ref=T_ref)[2]
    assert ours.input_embed.spk_encoder.min_frames == 5
    with torch.no_grad():
        want = hf.input_embed.spk_encoder(ref_mel)
        got = ours.input_embed.spk_encoder(ref_mel)
    assert got.shape == (3, CFG.enc_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _hf_rk4_step(f, t0, t1, y):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

    solver = RungeKutta4ODESolver(function=f, initial_value=y)
    delta, _ = solver._compute_step(f, t0, t1 - t0, t1, y)
    return y + delta


def test_rk4_step_matches_reference_solver(pair):
    """One 3/8-rule step of ours and of the reference solver, on the same guided DiT field and the same state."""
    hf, ours = pair
    codes, cond, ref_mel, x, _ = _inputs()
    ts = sway_schedule(10)
    with torch.no_grad():
        c = ours.prepare(codes, cond, ref_mel, guided=True)
        f_ours = lambda t, y: ours.velocity(y, t, c, 0.5)                       # noqa: E731
        f_hf = lambda t, y: _hf_velocity(hf, y, t, codes, cond, ref_mel, 0.5)   # noqa: E731
        for i in (0, 4, 8):
            want = _hf_rk4_step(f_hf, ts[i], ts[i + 1], x)
            torch.testing.assert_close(rk4_step(f_ours, ts[i], ts[i + 1], x), want, rtol=0, atol=1e-5)
    # the solver alone, in fp64 on a field that depends on t and y: the same formula to rounding
    f = lambda t, y: torch.sin(3 * t) * y - y ** 3                              # noqa: E731
    y = torch.linspace(-2, 2, 9, dtype=torch.float64)
    t0, t1 = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    torch.testing.assert_close(rk4_step(f, t0, t1, y), _hf_rk4_step(f, t0, t1, y), rtol=0, atol=1e-14)


@pytest.mark.parametrize("guidance", [0.0, 0.5])
def test_sample_matches_transformers_with_the_same_noise(pair, guidance):
    """The reference draws its start with torch.randn(B, T, mel) on the global generator and nothing else is random
    in eval mode, so seeding the global generator and drawing the same tensor ourselves gives the same noise."""
    hf, ours = pair
    codes, cond, ref_mel, _, _ = _inputs(B=1, N=30)
    torch.manual_seed(1234)
    with torch.no_grad():
        want = hf.sample(cond, ref_mel, codes, num_steps=10, guidance_scale=guidance, sway_coefficient=-1.0)
    torch.manual_seed(1234)
    noise = torch.randn(1, 60, CFG.mel_dim)
    got = ours.sample(codes, cond, ref_mel, steps=10, guidance=guidance, sway=-1.0, noise=noise)
    assert want.shape == (1, CFG.mel_dim, 60) and got.shape == (1, 60, CFG.mel_dim)
    torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-5)   # 36 DiT calls deep; measured 1.4e-6
    assert (got - noise).abs().mean() > 0.1                                    # it did move


def test_trajectory_starts_at_noise_and_ends_at_sample(pair):
    _, ours = pair
    codes, cond, ref_mel, x, _ = _inputs(N=12)
    ts, ys = ours.trajectory(codes, cond, ref_mel, steps=5, solver="euler", noise=x)
    assert ys.shape == (5, *x.shape) and torch.equal(ys[0], x)
    torch.testing.assert_close(ts, sway_schedule(5))
    torch.testing.assert_close(ys[-1], ours.sample(codes, cond, ref_mel, steps=5, solver="euler", noise=x))


# ----------------------------------------------------------------------------------------------------------------
# Attention paths and padding.
# ----------------------------------------------------------------------------------------------------------------
def test_backends_agree_with_padding(pair):
    _, ours = pair
    codes, cond, ref_mel, x, t = _inputs(B=3, N=40)
    lens = [40, 17, 30]
    with torch.no_grad():
        c = ours.prepare(codes, cond, ref_mel, code_lens=lens, guided=True)
        with use_backend("manual"):
            a = ours.velocity(x, t, c, 0.5)
        with use_backend("fused"):
            b = ours.velocity(x, t, c, 0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_backends_agree_on_gradients(pair):
    _, ours = pair
    codes, cond, ref_mel, x, t = _inputs(B=2, N=30)
    grads = []
    for backend in ("manual", "fused"):
        ours.zero_grad()
        with use_backend(backend):
            ours(x, t, codes, cond, ref_mel, code_lens=[30, 19]).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    ours.zero_grad()
    assert len(grads[0]) == len(list(ours.parameters()))
    for n, g in grads[0].items():   # relative to each tensor's largest entry (the time-MLP grads reach ~1e3)
        assert (g - grads[1][n]).abs().max() <= 1e-5 * g.abs().max() + 1e-5, n


def test_padding_does_not_change_valid_frames(pair):
    _, ours = pair
    codes, cond, ref_mel, x, t = _inputs(B=2, N=40)
    lens = [40, 21]
    with torch.no_grad():
        batched = ours(x, t, codes, cond, ref_mel, code_lens=lens)
        alone = ours(x[1:, :42], t[1:], codes[1:, :21], cond[1:], ref_mel[1:])
    torch.testing.assert_close(batched[1, :42], alone[0], rtol=0, atol=1e-5)
    assert batched[1, 42:].abs().max() == 0                      # padding frames never move
    torch.testing.assert_close(batched[0], ours(x[:1], t[:1], codes[:1], cond[:1], ref_mel[:1])[0].detach(),
                               rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Block masks and the receptive field.
# ----------------------------------------------------------------------------------------------------------------
def test_layer_masks_follow_the_definition(pair):
    _, ours = pair
    T = 100
    patterns = ours.layer_patterns(1, T)
    assert len({id(p) for p in patterns}) == len(set(CFG.layer_back_ahead)) == 3  # shared, not rebuilt per layer
    b = torch.arange(T) // CFG.block_size
    diff = b[None, :] - b[:, None]                               # b(j) - b(i)
    for (back, ahead), p in zip(CFG.layer_back_ahead, patterns):
        assert torch.equal(p.dense_mask()[0, 0], (diff >= -back) & (diff <= ahead))
    assert CFG.layer_back_ahead == [(1, 0), (0, 0), (0, 1), (1, 0)]


@pytest.mark.parametrize("cfg", [CFG, DiTConfig()], ids=["tiny", "official"])
def test_receptive_field_is_two_blocks_back_one_ahead(cfg):
    T = 7 * cfg.block_size
    b = torch.arange(T) // cfg.block_size
    back, ahead = cfg.receptive_blocks
    assert (back, ahead) == (2, 1)
    diff = b[None, :] - b[:, None]
    assert torch.equal(receptive_field(cfg, T), (diff >= -back) & (diff <= ahead))


def test_network_dependence_equals_receptive_field(pair):
    """Which input frames actually change output frame i (by autograd) is exactly what the composed masks say."""
    _, ours = pair
    codes, cond, ref_mel, x, t = _inputs(B=1, N=6 * CFG.block_size // 2)     # 6 blocks of frames
    T = x.shape[1]
    with torch.no_grad():
        c = ours.prepare(codes, cond, ref_mel)
    R = receptive_field(CFG, T)
    for i in (0, 30, 70, T - 1):
        xi = x.clone().requires_grad_(True)
        ours.velocity(xi, t, c)[0, i].sum().backward()
        assert torch.equal(xi.grad[0].abs().sum(-1) > 0, R[i]), i


# ----------------------------------------------------------------------------------------------------------------
# Solvers and the time schedule.
# ----------------------------------------------------------------------------------------------------------------
def test_sway_schedule_values():
    want = [0, .0152, .0603, .134, .234, .357, .5, .658, .826, 1]
    assert [round(v, 3) for v in sway_schedule(10, -1.0).tolist()] == [round(v, 3) for v in want]
    torch.testing.assert_close(sway_schedule(10, None), torch.linspace(0, 1, 10))
    torch.testing.assert_close(sway_schedule(4, 0.0), torch.linspace(0, 1, 4))


def test_euler_is_first_order_and_rk4_fourth_order():
    """dy/dt = -y, y(0) = 1, so y(1) = 1/e. Halving the step divides the error by 2^order: ~2 (Euler), ~16 (RK4)."""
    f = lambda t, y: -y                                          # noqa: E731
    y0, exact = torch.ones(1, dtype=torch.float64), math.exp(-1)

    def err(solver, n):
        ts = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        return abs(integrate(f, y0, ts, solver)[-1].item() - exact)

    assert 0.95 < math.log2(err("euler", 20) / err("euler", 40)) < 1.05      # measured 1.01
    assert 3.9 < math.log2(err("rk4", 10) / err("rk4", 20)) < 4.2            # measured 4.06
    assert err("rk4", 5) < err("euler", 20) / 100                # same 20 evaluations of f: RK4 is far closer


def test_single_steps_on_a_linear_ode():
    f = lambda t, y: 3.0 * y                                     # noqa: E731  y(t) = y0 e^(3t)
    y = torch.tensor([2.0], dtype=torch.float64)
    assert euler_step(f, 0.0, 0.1, y).item() == pytest.approx(2.6)
    # a 4th-order method matches exp(0.3) through the h^4 term of its Taylor series
    assert rk4_step(f, 0.0, 0.1, y).item() == pytest.approx(2 * (1 + .3 + .3 ** 2 / 2 + .3 ** 3 / 6 + .3 ** 4 / 24))


# ----------------------------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------------------------
def test_overfit_one_batch_then_sample_it_back():
    """200 AdamW steps on one batch (fixed noise, random t): the loss ends below 10% of its start (measured ~1.5%),
    and integrating from that noise lands near the data (measured MSE ~0.03, against 2.1 at the start)."""
    torch.manual_seed(0)
    dit = DiT(CFG)
    g = torch.Generator().manual_seed(0)
    B, N = 2, 24
    codes = torch.randint(0, 32, (B, N), generator=g)
    mel = torch.randn(32, CFG.mel_dim, generator=g)[codes].repeat_interleave(CFG.repeats, 1)  # each code: a column
    mel = mel + 0.3 * torch.randn(mel.shape, generator=g)
    cond, ref_mel = torch.randn(B, CFG.enc_emb_dim, generator=g), torch.randn(B, 16, CFG.mel_dim, generator=g)
    x0 = torch.randn(mel.shape, generator=g)
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = flow_matching_loss(dit, mel, codes, cond, ref_mel, noise=x0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.1 * losses[0]
    dit.eval()
    out = dit.sample(codes, cond, ref_mel, guidance=0.0, noise=x0)
    assert (out - mel).pow(2).mean() < 0.1 < (x0 - mel).pow(2).mean()


def test_loss_ignores_padding_and_condition_dropout_runs(pair):
    _, ours = pair
    codes, cond, ref_mel, x, t = _inputs(B=2, N=30)
    mel, x0 = x, torch.randn(x.shape)
    a = flow_matching_loss(ours, mel, codes, cond, ref_mel, code_lens=[30, 12], t=t, noise=x0)
    mel2 = mel.clone()
    mel2[1, 24:] = 1e3                                           # garbage in the padding of row 1
    b = flow_matching_loss(ours, mel2, codes, cond, ref_mel, code_lens=[30, 12], t=t, noise=x0)
    torch.testing.assert_close(a, b)
    # dropping every row's conditions equals feeding the unconditioned inputs
    g = torch.Generator().manual_seed(0)
    dropped = flow_matching_loss(ours, mel, codes, cond, ref_mel, t=t, noise=x0, drop_prob=1.0, generator=g)
    plain = flow_matching_loss(ours, mel, torch.zeros_like(codes), 0 * cond, 0 * ref_mel, t=t, noise=x0)
    torch.testing.assert_close(dropped, plain)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.
# ----------------------------------------------------------------------------------------------------------------
def _bad(**kw):
    codes, cond, ref_mel, _, _ = _inputs(B=2, N=8)
    args = dict(codes=codes, cond=cond, ref_mel=ref_mel)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw, err, words", [
    (dict(codes=torch.zeros(2, 0, dtype=torch.long)), ValueError, "at least one code"),
    (dict(codes=torch.full((2, 8), CFG.num_embeds + 1)), ValueError, f"[0, {CFG.num_embeds + 1})"),
    (dict(codes=torch.full((2, 8), -1)), ValueError, "codes holds id -1"),
    (dict(codes=torch.zeros(2, 8)), TypeError, "codes must hold integer"),
    (dict(codes=torch.zeros(16, dtype=torch.long)), ValueError, "codes must have 2 dimensions"),
    (dict(codes=torch.zeros(2, CFG.max_mel_len // CFG.repeats + 1, dtype=torch.long)), ValueError, "max_mel_len"),
    (dict(ref_mel=torch.zeros(2, 20, CFG.mel_dim + 1)), ValueError, f"ref_mel must have last dimension {CFG.mel_dim}"),
    (dict(ref_mel=torch.zeros(20, CFG.mel_dim)), ValueError, "ref_mel must have 3 dimensions"),
    (dict(ref_mel=torch.zeros(2, 4, CFG.mel_dim)), ValueError, "ref_mel must have at least 5 frames"),
    (dict(ref_mel=torch.zeros(3, 20, CFG.mel_dim)), ValueError, "batch size 2"),
    (dict(ref_mel=torch.full((2, 20, CFG.mel_dim), float("nan"))), ValueError, "ref_mel contains NaN"),
    (dict(cond=torch.full((2, CFG.enc_emb_dim), float("inf"))), ValueError, "cond contains NaN or infinite"),
    (dict(cond=torch.zeros(2, CFG.enc_emb_dim + 1)), ValueError, f"cond must have last dimension {CFG.enc_emb_dim}"),
    (dict(cond=[0.0] * CFG.enc_emb_dim), TypeError, "cond must be a torch.Tensor"),
    (dict(noise=torch.full((2, 16, CFG.mel_dim), float("nan"))), ValueError, "noise contains NaN"),
    (dict(noise=torch.zeros(2, 15, CFG.mel_dim)), ValueError, "noise must have shape (2, 16, 80)"),
    (dict(code_lens=[8, 9]), ValueError, "code_lens must lie in [1, 8]"),
    (dict(code_lens=[8]), ValueError, "code_lens must be 2 integers"),
    (dict(steps=1), ValueError, "steps must be an integer >= 2"),
    (dict(solver="heun"), ValueError, "solver must be one of ['euler', 'rk4']"),
    (dict(guidance=-0.5), ValueError, "guidance must be a finite number >= 0"),
    (dict(sway=float("nan")), ValueError, "sway must be a finite number"),
])
def test_sample_rejects_bad_input(pair, kw, err, words):
    _, ours = pair
    args = _bad(**kw)
    args.setdefault("steps", 2)
    with pytest.raises(err) as e:
        ours.sample(**args)
    assert words in str(e.value)


def test_forward_and_loss_reject_bad_shapes(pair):
    _, ours = pair
    codes, cond, ref_mel, x, t = _inputs(B=2, N=8)
    with pytest.raises(ValueError, match=r"x must have shape \(2, 16, 80\)"):
        ours(x[:, :15], t, codes, cond, ref_mel)
    with pytest.raises(ValueError, match="x must have last dimension 80"):
        ours(x[..., :40], t, codes, cond, ref_mel)
    with pytest.raises(ValueError, match=r"t must be a number or a tensor of shape \(2,\)"):
        ours(x, torch.rand(3), codes, cond, ref_mel)
    with pytest.raises(ValueError, match=r"guidance=0.5 needs conditioning built with prepare\(..., guided=True\)"):
        ours.velocity(x, t, ours.prepare(codes, cond, ref_mel), guidance=0.5)
    with pytest.raises(ValueError, match="mel contains NaN"):
        flow_matching_loss(ours, torch.full_like(x, float("nan")), codes, cond, ref_mel)
    with pytest.raises(ValueError, match=r"mel must have shape \(2, 16, 80\)"):
        flow_matching_loss(ours, x[:, :10], codes, cond, ref_mel)
