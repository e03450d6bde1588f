"""The strict unified-diff applier: exact context, offsets reported, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from habuild.patching import PatchError, apply_series, parse_patch

UPSTREAM = "".join(f"line {i}\n" for i in range(1, 41))

PATCH = """Subject: demo: add a hook
Why: tests
Upstream-Status: not yet proposed
---
diff --git a/pkg/mod.py b/pkg/mod.py
--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -4,3 +4,4 @@
 line 4
 line 5
+hook()
 line 6
@@ -30,3 +31,3 @@
 line 30
-line 31
+line 31 changed
 line 32
"""

NEW_FILE = """Subject: demo: new module
---
--- /dev/null
+++ b/pkg/new.py
@@ -0,0 +1,2 @@
+a = 1
+b = 2
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_header_fields_are_parsed():
    patch = parse_patch(PATCH, "p")
    assert patch.header == {"Subject": "demo: add a hook", "Why": "tests",
                            "Upstream-Status": "not yet proposed"}
    assert [f.path for f in patch.files] == ["pkg/mod.py"]
    assert len(patch.files[0].hunks) == 2


def test_exact_hunks_apply_with_zero_offset(tmp_path):
    result = apply_series([_write(tmp_path, "0001.patch", PATCH)], {"pkg/mod.py": UPSTREAM}.get)
    new = result.files["pkg/mod.py"].splitlines()
    assert new[5] == "hook()" and new[31] == "line 31 changed" and len(new) == 41
    assert result.offsets == []
    assert result.originals["pkg/mod.py"] == UPSTREAM


def test_moved_context_applies_but_reports_the_offset(tmp_path):
    shifted = "extra\n" * 3 + UPSTREAM
    result = apply_series([_write(tmp_path, "0001.patch", PATCH)], {"pkg/mod.py": shifted}.get)
    assert [h.offset for h in result.hunks] == [3, 3]
    assert len(result.offsets) == 2


def test_changed_context_fails_naming_patch_file_and_hunk(tmp_path):
    broken = UPSTREAM.replace("line 5\n", "line five\n")
    with pytest.raises(PatchError) as e:
        apply_series([_write(tmp_path, "0007-hook.patch", PATCH)], {"pkg/mod.py": broken}.get)
    msg = str(e.value)
    assert "0007-hook.patch" in msg and "pkg/mod.py" in msg and "@@ -4,3 +4,4 @@" in msg
    assert "'line five'" in msg and "'line 5'" in msg


def test_missing_target_file_is_named(tmp_path):
    with pytest.raises(PatchError, match="pkg/mod.py not found"):
        apply_series([_write(tmp_path, "0001.patch", PATCH)], {}.get)


def test_new_file_is_created_and_refuses_to_overwrite(tmp_path):
    p = _write(tmp_path, "0002.patch", NEW_FILE)
    assert apply_series([p], {}.get).files["pkg/new.py"] == "a = 1\nb = 2\n"
    with pytest.raises(PatchError, match="already exists"):
        apply_series([p], {"pkg/new.py": "x\n"}.get)


def test_later_patch_sees_earlier_patch_output(tmp_path):
    second = PATCH.replace("+hook()\n line 6", "+hook2()\n line 6").replace(
        " line 5\n+hook2()", " hook()\n+hook2()").replace(
        "@@ -4,3 +4,4 @@\n line 4\n", "@@ -5,3 +5,4 @@\n line 5\n", 1)
    second = second.split("@@ -30")[0]
    paths = [_write(tmp_path, "0001.patch", PATCH), _write(tmp_path, "0002.patch", second)]
    new = apply_series(paths, {"pkg/mod.py": UPSTREAM}.get).files["pkg/mod.py"].splitlines()
    assert new[4:8] == ["line 5", "hook()", "hook2()", "line 6"]


def test_not_a_diff_is_rejected():
    with pytest.raises(PatchError, match="no file changes"):
        parse_patch("Subject: nothing here\n", "empty.patch")


def test_no_newline_at_end_of_file(tmp_path):
    patch = ("--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n"
             "+c\n\\ No newline at end of file\n")
    out = apply_series([_write(tmp_path, "p.patch", patch)], {"f": "a\nb"}.get).files["f"]
    assert out == "a\nc"


def test_mismatch_line_is_numbered_as_in_the_upstream_file(tmp_path):
    broken = UPSTREAM.replace("line 31\n", "line thirty-one\n")
    with pytest.raises(PatchError, match=r"line 31 is 'line thirty-one', expected 'line 31'"):
        apply_series([_write(tmp_path, "0001.patch", PATCH)], {"pkg/mod.py": broken}.get)
