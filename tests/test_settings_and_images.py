"""Settings parsing (flags over environment over defaults) and the SDK's image conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_client import IMAGE_BYTES, ImageError, to_batch, to_image_bytes
from server.settings import Settings, env_var, parse_settings


def test_defaults() -> None:
    s = parse_settings(["--model-dir", "m"], environ={})
    assert s == Settings(model_dir=Path("m"))
    assert (s.port, s.metrics_port, s.max_batch_size, s.batch_timeout_ms) == (8500, 9100, 256, 0.0)


def test_environment_then_flags() -> None:
    env = {env_var("model_dir"): "/models", "MNIST_MAX_BATCH_SIZE": "64", "MNIST_PORT": "9000"}
    s = parse_settings([], environ=env)
    assert s.model_dir == Path("/models") and s.max_batch_size == 64 and s.port == 9000
    s = parse_settings(["--max-batch-size", "8"], environ=env)
    assert s.max_batch_size == 8 and s.port == 9000


def test_every_field_has_a_flag_and_a_variable() -> None:
    from dataclasses import fields

    from server.settings import build_parser

    help_text = build_parser({}).format_help()
    for f in fields(Settings):
        assert "--" + f.name.replace("_", "-") in help_text
        assert env_var(f.name) in help_text


def settings_rows() -> list[str]:
    """The README's settings table, one markdown row per flag, from the settings themselves."""
    from dataclasses import MISSING, fields

    from server.settings import HELP

    rows = []
    for f in fields(Settings):
        default = (
            "required" if f.default is MISSING else "—" if f.default is None else f"`{f.default}`"
        )
        flag = "--" + f.name.replace("_", "-")
        rows.append(f"| `{flag}` | `{env_var(f.name)}` | {default} | {HELP[f.name]} |")
    return rows


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [row for row in settings_rows() if row not in readme]
    assert not missing, "README's settings table lacks (or differs from):\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "--model-dir"),
        (["--model-dir", "m", "--max-batch-size", "0"], {}, "--max-batch-size must be >= 1"),
        (["--model-dir", "m", "--tls-cert", "c"], {}, "--tls-cert and --tls-key go together"),
        (["--model-dir", "m"], {"MNIST_PORT": "http"}, "MNIST_PORT='http' is not a valid int"),
        (["--model-dir", "m", "--port", "http"], {}, "invalid int value: 'http'"),
        (["--model-dir", "m", "--max-queue-images", "10"], {}, "--max-queue-images must be >="),
        (["--model-dir", "m"], {"MNIST_RUNTIME": "onnx"}, "--runtime must be one of auto, litert"),
        (["--model-dir", "m", "--port", "70000"], {}, "--port must be 0-65535"),
        (["--model-dir", "m", "--port", "-5"], {}, "--port must be 0-65535"),
        (["--model-dir", "m", "--metrics-port", "70000"], {}, "--metrics-port must be 0-65535"),
        (["--model-dir", "m", "--log-level", "LOUD"], {}, "--log-level must be one of DEBUG"),
        (["--model-dir", "m"], {"MNIST_LOG_LEVEL": "loud"}, "--log-level must be one of DEBUG"),
        (["--model-dir", "m", "--read-timeout-seconds", "0"], {}, "--read-timeout-seconds and"),
    ],
)
def test_bad_settings_exit_with_one_line(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, environ=env)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "(see python -m server --help)" in err, err  # no usage


def test_arrays_and_bytes() -> None:
    img = np.arange(784, dtype=np.uint8).reshape(28, 28)
    assert to_image_bytes(img) == img.tobytes()
    assert to_image_bytes(img.astype(np.int64)) == img.tobytes()
    assert to_image_bytes(img.tobytes()) == img.tobytes()
    batch = to_batch(np.stack([img, img]))
    assert batch == [img.tobytes()] * 2
    for bad, msg in [
        (np.zeros((28, 27), np.uint8), "shape"),
        (np.zeros((28, 28), np.float32), "dtype float32"),
        (np.full((28, 28), 300), "outside 0-255"),
        (b"123", "has 3 bytes"),
        (3.5, "cannot read an image from float"),
    ]:
        with pytest.raises(ImageError, match=msg):
            to_image_bytes(bad)


def test_files_are_converted_the_way_mnist_looks(
    tmp_path: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    from PIL import Image

    digit = mnist_test[0][0]
    Image.fromarray(digit).save(tmp_path / "same.png")
    assert to_image_bytes(tmp_path / "same.png") == digit.tobytes()  # already MNIST-shaped

    # a big dark-on-light scan of the same digit, off centre, in colour
    big = Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (400, 360), "white")
    canvas.paste(big.convert("RGB"), (100, 60))
    canvas.save(tmp_path / "scan.jpg")
    out = np.frombuffer(to_image_bytes(tmp_path / "scan.jpg"), np.uint8).reshape(28, 28)
    assert out[0].max() < 40 and out[:, 0].max() < 40  # black border
    assert out.max() > 200  # white ink
    ys, xs = np.nonzero(out > 50)
    assert abs(ys.mean() - 13.5) < 3 and abs(xs.mean() - 13.5) < 3  # centred

    (tmp_path / "raw.bin").write_bytes(digit.tobytes())
    assert to_image_bytes(tmp_path / "raw.bin") == digit.tobytes()
    (tmp_path / "junk.txt").write_text("hello")
    with pytest.raises(ImageError, match="neither an image file nor 784 raw bytes"):
        to_image_bytes(tmp_path / "junk.txt")
    with pytest.raises(ImageError, match="No such file"):
        to_image_bytes(tmp_path / "missing.png")
    assert IMAGE_BYTES == 784
