"""efficienttrain.fourier against an independent numpy reference and Proposition 1."""
import numpy as np
import pytest
import torch

from efficienttrain.fourier import downsample, high_pass_filter, low_frequency_crop, low_pass_filter


def numpy_crop(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """The issue's definition, literally: fft2, fftshift, centred block, ifftshift, ifft2, real, scale."""
    H, W = x.shape[-2:]
    spec = np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1))
    r0, c0 = H // 2 - h // 2, W // 2 - w // 2
    block = spec[..., r0:r0 + h, c0:c0 + w]
    return np.real(np.fft.ifft2(np.fft.ifftshift(block, axes=(-2, -1)))) * (h * w) / (H * W)


def centred_block(spec: np.ndarray, h: int, w: int) -> np.ndarray:
    H, W = spec.shape[-2:]
    s = np.fft.fftshift(spec, axes=(-2, -1))
    return s[..., H // 2 - h // 2:H // 2 - h // 2 + h, W // 2 - w // 2:W // 2 - w // 2 + w]


SHAPES = [  # (H, W, h, w): even/odd, square/non-square, extremes
    (32, 32, 16, 16), (32, 32, 15, 17), (31, 33, 12, 7), (24, 20, 24, 5), (17, 16, 1, 1),
    (224, 224, 96, 96), (28, 40, 27, 39), (16, 20, 16, 10), (20, 16, 10, 16), (9, 10, 9, 4),
]


@pytest.mark.parametrize("H,W,h,w", SHAPES)
def test_crop_matches_numpy_formula(H, W, h, w):
    x = np.random.default_rng(H * W + h).standard_normal((2, 3, H, W))
    out = low_frequency_crop(torch.from_numpy(x).float(), (h, w))
    assert out.shape == (2, 3, h, w) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), numpy_crop(x, h, w), atol=2e-5, rtol=0)


def test_crop_matches_numpy_on_random_shapes():
    rng = np.random.default_rng(42)
    for _ in range(60):
        H, W = rng.integers(1, 14, size=2)
        h, w = rng.integers(1, H + 1), rng.integers(1, W + 1)
        x = rng.standard_normal((2, H, W))
        out = low_frequency_crop(torch.from_numpy(x), (int(h), int(w))).numpy()
        np.testing.assert_allclose(out, numpy_crop(x, h, w), atol=1e-12, err_msg=f"{(H, W, h, w)}")


def test_crop_float64_is_exact_and_int_size():
    x = np.random.default_rng(1).standard_normal((4, 20, 20))
    out = low_frequency_crop(torch.from_numpy(x), 12)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), numpy_crop(x, 12, 12), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_crop_half_precision_returns_input_dtype(dtype):
    x = torch.randn(2, 3, 32, 32)
    out = low_frequency_crop(x.to(dtype), 16)
    assert out.dtype == dtype
    ref = numpy_crop(x.to(dtype).double().numpy(), 16, 16)  # computed in float32 from the rounded input
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    np.testing.assert_allclose(out.double().numpy(), ref, atol=tol)


def test_constant_image_stays_constant_and_identity():
    x = torch.full((2, 3, 30, 22), 0.37)
    np.testing.assert_allclose(low_frequency_crop(x, (11, 8)).numpy(), 0.37, atol=1e-6)
    y = torch.randn(1, 3, 16, 16)
    assert low_frequency_crop(y, 16) is y


def test_crop_preserves_low_frequency_cosine():
    # A cosine at frequency 3 (cycles per image) survives a crop to 16 unchanged in amplitude:
    # the crop samples the same continuous band-limited signal on a coarser grid.
    n = np.arange(64)
    img = np.cos(2 * np.pi * 3 * n / 64)[None, :] * np.ones((64, 1))
    out = low_frequency_crop(torch.from_numpy(img), 16).numpy()
    m = np.arange(16)
    np.testing.assert_allclose(out, np.cos(2 * np.pi * 3 * m / 16)[None, :] * np.ones((16, 1)), atol=1e-12)


@pytest.mark.parametrize("H,W,h,w", [(33, 31, 11, 9), (32, 32, 16, 12)])
def test_proposition_1a_spectrum_is_scaled_central_block_and_invertible(H, W, h, w):
    x = np.random.default_rng(7).standard_normal((H, W))
    crop = low_frequency_crop(torch.from_numpy(x), (h, w)).numpy()
    spec_crop = np.fft.fftshift(np.fft.fft2(crop))
    expected = centred_block(np.fft.fft2(x), h, w) * (h * w) / (H * W)
    # Away from the Nyquist row/column of even output sizes (where taking the real part folds
    # the unpaired frequency), the crop's spectrum IS the scaled central block ...
    rows = slice(1 if h % 2 == 0 else 0, h)
    cols = slice(1 if w % 2 == 0 else 0, w)
    np.testing.assert_allclose(spec_crop[rows, cols], expected[rows, cols], atol=1e-9)
    # ... so the original's central block is recovered from the crop alone.
    recovered = spec_crop * (H * W) / (h * w)
    np.testing.assert_allclose(recovered[rows, cols], centred_block(np.fft.fft2(x), h, w)[rows, cols], atol=1e-8)
    # and the crop depends on nothing else: changing frequencies outside the block leaves it unchanged
    spec = np.fft.fftshift(np.fft.fft2(x))
    outside = np.ones_like(spec, dtype=bool)
    outside[H // 2 - h // 2 - 1:H // 2 - h // 2 + h + 1, W // 2 - w // 2 - 1:W // 2 - w // 2 + w + 1] = False
    noise = np.fft.fftshift(np.fft.fft2(np.random.default_rng(8).standard_normal((H, W))))
    x2 = np.real(np.fft.ifft2(np.fft.ifftshift(np.where(outside, noise, spec))))
    np.testing.assert_allclose(low_frequency_crop(torch.from_numpy(x2), (h, w)).numpy(), crop, atol=1e-9)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area", "nearest"])
def test_proposition_1b_downsampling_sees_high_frequencies(mode):
    # An image made only of frequencies outside the central 16x16 block: the crop removes it
    # entirely, while every interpolation-based down-sampling leaks some of it.
    H = 64
    n = np.arange(H)
    img = np.cos(2 * np.pi * 10 * n / H)[None, :] * np.cos(2 * np.pi * 13 * n / H)[:, None]
    t = torch.from_numpy(img)[None, None]
    cropped = low_frequency_crop(t, 16)
    down = downsample(t, 16, mode)
    assert cropped.abs().max().item() < 1e-10
    assert down.abs().max().item() > 1e-3


def test_downsample_is_torch_interpolate_with_antialias():
    x = torch.randn(2, 3, 40, 36)
    ref = torch.nn.functional.interpolate(x, size=(20, 12), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(downsample(x, (20, 12), "bicubic"), ref)
    assert downsample(x.half(), 8, "area").dtype == torch.float16


def test_low_and_high_pass_filters_against_numpy():
    H, W, r = 24, 30, 5.5
    x = np.random.default_rng(3).standard_normal((2, H, W))
    fy = np.fft.fftfreq(H) * H
    fx = np.fft.fftfreq(W) * W
    mask = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) <= r
    spec = np.fft.fft2(x)
    low_ref = np.real(np.fft.ifft2(spec * mask))
    low = low_pass_filter(torch.from_numpy(x), r).numpy()
    high = high_pass_filter(torch.from_numpy(x), r).numpy()
    np.testing.assert_allclose(low, low_ref, atol=1e-10)
    np.testing.assert_allclose(low + high, x, atol=1e-10)  # the two bands partition the spectrum
    np.testing.assert_allclose(low_pass_filter(torch.from_numpy(x), 0).numpy(), x.mean(axis=(-2, -1), keepdims=True) * np.ones_like(x), atol=1e-10)


@pytest.mark.parametrize("size", [0, 33, (16, 0), (8, 40), -1])
def test_crop_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="output size|size must be"):
        low_frequency_crop(torch.zeros(1, 32, 32), size)


def test_crop_rejects_bad_inputs():
    with pytest.raises(ValueError, match="dtype torch.uint8 is not supported; allowed"):
        low_frequency_crop(torch.zeros(1, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        low_frequency_crop(torch.zeros(8, 8, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., H, W\]"):
        low_frequency_crop(torch.zeros(8), 4)
    with pytest.raises(ValueError, match="size must be an int or a pair"):
        low_frequency_crop(torch.zeros(8, 8), "4")
    with pytest.raises(ValueError, match="mode 'lanczos' is not supported; allowed"):
        downsample(torch.zeros(1, 8, 8), 4, "lanczos")
    with pytest.raises(ValueError, match="radius must be"):
        low_pass_filter(torch.zeros(8, 8), -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crop_on_cuda_matches_numpy():
    x = np.random.default_rng(5).standard_normal((4, 3, 224, 224))
    out = low_frequency_crop(torch.from_numpy(x).float().cuda(), 96)
    assert out.is_cuda
    np.testing.assert_allclose(out.double().cpu().numpy(), numpy_crop(x, 96, 96), atol=2e-5)
    half = low_frequency_crop(torch.from_numpy(x).cuda().half(), 160)
    assert half.dtype == torch.float16
