"""Settings: every field carries its help text; on/off settings are booleans."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from mnist_client import AsyncDigitClient
from server.settings import HELP, Settings, parse_settings

from .fakes import StartFake, fake_digit

pytestmark = pytest.mark.fast


def test_every_setting_has_its_help_beside_it() -> None:
    for f in fields(Settings):
        assert f.metadata.get("help"), f.name
    assert HELP["server_timing"].startswith("on (or true, yes, 1)")


@pytest.mark.parametrize(
    ("text", "value"), [("on", True), ("OFF", False), ("true", True), ("0", False), ("no", False)]
)
def test_on_off_settings_are_booleans_from_flag_and_variable(text: str, value: bool) -> None:
    from_flag = parse_settings(["--model-dir", "m", "--server-timing", text], environ={})
    from_env = parse_settings(["--model-dir", "m"], environ={"MNIST_SERVER_TIMING": text})
    assert from_flag.server_timing is value and from_env.server_timing is value
    assert parse_settings(["--model-dir", "m"], environ={}).server_timing is True


def test_an_on_off_setting_refuses_anything_else(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_settings(["--model-dir", str(Path("m")), "--server-timing", "maybe"], environ={})
    assert info.value.code == 2
    assert "--server-timing" in capsys.readouterr().err


async def test_server_timing_off_sends_no_timing(start_fake: StartFake) -> None:
    on, off = await start_fake(), await start_fake("--server-timing", "off")
    for fake, timed in ((on, True), (off, False)):
        async with AsyncDigitClient(fake.target) as client:
            prediction = await client.predict(fake_digit(4), timeout=10)
        assert prediction.digit == 4
        assert (prediction.timing is not None) is timed
