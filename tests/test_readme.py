"""The README's settings table is the settings' documentation: every CTR_ setting is in it."""

from pathlib import Path

from ctr.settings import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [f"CTR_{name.upper()}" for name in Settings.model_fields if f"| `CTR_{name.upper()}` |" not in text]
    assert missing == [], f"settings missing from README's table: {missing}"
