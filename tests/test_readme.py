"""docs/settings.md's table is the settings' documentation: every CTR_ setting is in it."""

from pathlib import Path

from ctr.settings import Settings

SETTINGS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def test_every_setting_is_documented() -> None:
    text = SETTINGS_PAGE.read_text()
    missing = [f"CTR_{name.upper()}" for name in Settings.model_fields if f"| `CTR_{name.upper()}` |" not in text]
    assert missing == [], f"settings missing from docs/settings.md's table: {missing}"
