"""Every bundled BACnet profile and the driver's sample site load, so they cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.bacnet.config import BacnetProfile
from drivers.bacnet.source import build_sources
from gateway.cli import main
from gateway.config.site import FIRMWARE_CONFIGS, load_profile, load_site

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "drivers" / "bacnet" / "sample-site.yaml"
PROFILES = sorted((FIRMWARE_CONFIGS / "devices").glob("bacnet-*.yaml"))


def test_there_are_vav_ahu_and_lighting_profiles() -> None:
    names = {p.stem for p in PROFILES}
    assert {"bacnet-kmc-simplyvav", "bacnet-jci-series5-rtu", "bacnet-bacmove-dalione-room"} <= names


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_loads_and_names_its_source(path: Path) -> None:
    profile = load_profile(path.stem, BacnetProfile, [path.parent])
    assert isinstance(profile, BacnetProfile)
    assert profile.doc and profile.coverage and profile.points


def test_sample_site_loads_and_plans(capsys: pytest.CaptureFixture[str]) -> None:
    site = load_site(SAMPLE)
    sources = build_sources(site)
    assert [s.name for s in sources] == ["bacnet[bms]"]
    assert sources[0].devices == {"vav_3_01", "ahu_1", "light_3_01"}
    assert site.registry["ahu_1.heating_dat_upper_sp"].writable
    assert site.registry["ahu_1.heating_dat_upper_sp"].max == 134
    assert site.registry["vav_3_01.space_temp"].unit == "°F"
    assert main(["bacnet", "plan", str(SAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "vav_3_01 (device 30101, 192.168.20.40): 1 ReadPropertyMultiple request reading 26 properties" in out
    assert "ahu_1 (device 1001, found by Who-Is)" in out
