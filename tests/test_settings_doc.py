"""docs/settings.md is what the Settings class says, grouped by its sections; no CTR_ name changed."""

from __future__ import annotations

import subprocess
import sys

from ctr import settings
from ctr.settings import DOC, SECTIONS, Settings, markdown

# Names that tools outside the code rely on (DESIGN.md): grouping must never rename them.
KEPT = ["CTR_REDIS_URL", "CTR_DATABASE_URL", "CTR_MAX_ADS", "CTR_DEADLINE_MS", "CTR_MODEL_URLS", "CTR_LB_POLICY",
        "CTR_ADMIN_TOKEN", "CTR_MAX_BODY_BYTES", "CTR_REQUEST_ID_KEY"]  # fmt: skip


def test_the_sections_hold_every_setting_once_in_the_class_order() -> None:
    """Every field is in exactly one section, and the class declares them section by section."""
    named = [name for _, names in SECTIONS for name in names]
    assert named == list(Settings.model_fields)


def test_the_settings_page_is_current() -> None:
    """docs/settings.md equals what the code generates (run `python -m ctr.settings --write`)."""
    assert DOC.read_text() == markdown(), "docs/settings.md is stale: run `python -m ctr.settings --write`"


def test_the_page_names_every_variable_under_its_section() -> None:
    """Each section is a heading; each CTR_ variable a row; the design card's names are there."""
    text = markdown()
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == [t for t, _ in SECTIONS]
    rows = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `CTR_")}
    assert rows == {f"CTR_{n.upper()}" for n in Settings.model_fields} and set(KEPT) <= rows


def test_python_m_ctr_settings_prints_the_page() -> None:
    """The regeneration command prints the same page (--write puts it in docs/settings.md)."""
    out = subprocess.run([sys.executable, "-m", "ctr.settings"], capture_output=True, text=True, check=True)
    assert out.stdout == markdown()


def test_defaults_name_no_machine_path() -> None:
    """The project root is written <checkout>, so the page is the same on every machine."""
    assert str(settings.PROJECT_ROOT) not in markdown() and "`<checkout>/data`" in markdown()
