"""Static checks of the Slicer module files that cannot run here (no Slicer application): UI, CMake, resources."""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
MODULE = REPOSITORY / "MedCLIPSAM"
UI_FILE = MODULE / "Resources" / "UI" / "MedCLIPSAM.ui"
MODULE_FILE = MODULE / "MedCLIPSAM.py"
EFFECT_FILE = MODULE / "SegmentEditorTextPromptEffectLib" / "SegmentEditorEffect.py"


def _ui_widgets() -> dict[str, ElementTree.Element]:
    tree = ElementTree.parse(UI_FILE)
    return {widget.get("name"): widget for widget in tree.iter("widget")}


def _parameter_fields() -> dict[str, str]:
    """Return {field name: annotation source} of the MedCLIPSAMParameterNode class."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "MedCLIPSAMParameterNode":
            return {
                statement.target.id: ast.unparse(statement.annotation)
                for statement in node.body
                if isinstance(statement, ast.AnnAssign)
            }
    raise AssertionError("MedCLIPSAMParameterNode not found in MedCLIPSAM.py")


def test_ui_file_parses():
    root = ElementTree.parse(UI_FILE).getroot()

    assert root.tag == "ui"
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_widget_names_used_in_code_exist():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    widgets = _ui_widgets()

    assert used, "the Widget code uses no self.ui names"
    missing = sorted(used - set(widgets))
    assert missing == []


def test_bound_widgets_match_parameter_fields():
    fields = _parameter_fields()
    bound = {}
    for name, widget in _ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text

    assert sorted(set(bound.values()) - set(fields)) == []
    # Every field except the file paths (ctkPathLineEdit, copied by hand) has a widget.
    unbound = set(fields) - set(bound.values())
    assert unbound == {"samCheckpoint", "modelsFolder", "weakModelCheckpoint"}


def test_combo_box_items_match_choices():
    fields = _parameter_fields()
    widgets = _ui_widgets()
    for widget_name, field in (
        ("axisComboBox", "axis"), ("deviceComboBox", "device"), ("samTypeComboBox", "samType"),
        ("precisionComboBox", "precision"),
    ):
        items = [item.find("property/string").text for item in widgets[widget_name].findall("item")]
        constant = re.search(r"Choice\(list\((\w+)\)\)", fields[field]).group(1)
        module_source = MODULE_FILE.read_text(encoding="utf-8")
        choices = ast.literal_eval(re.search(rf"^{constant} = (\(.*?\))$", module_source, re.M).group(1))
        assert items == list(choices), widget_name


def _cmake_listed(cmake_text: str) -> set[str]:
    return set(re.findall(r"^\s+([\w${}/.-]+\.(?:py|png|ui|txt|jpg))\s*$", cmake_text, re.M))


def test_cmake_lists_every_module_file():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "MedCLIPSAM")
    listed = _cmake_listed(cmake)
    expected = {
        path.relative_to(MODULE).as_posix()
        for path in MODULE.rglob("*")
        if path.suffix in (".py", ".png", ".ui") and "__pycache__" not in path.parts
    }

    assert sorted(expected - listed) == []
    assert sorted(path for path in listed if not (MODULE / path).exists() and not (REPOSITORY / path).exists()) == []


def test_cmake_lists_top_level_resources():
    top = (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = _cmake_listed(top)

    assert "Resources/requirements.txt" in listed
    assert sorted(path for path in listed if not (REPOSITORY / path).exists()) == []


def test_cmake_registers_self_test_and_library():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    top = (REPOSITORY / "CMakeLists.txt").read_text(encoding="utf-8")

    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert "${CMAKE_CURRENT_SOURCE_DIR}/MedCLIPSAMLib/*.py" in top
    assert "project(MedCLIPSAM)" in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(MedCLIPSAM)" in top


def test_requirements_leave_slicer_packages_alone():
    from packaging.requirements import Requirement

    lines = (REPOSITORY / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    names = {Requirement(line).name.lower() for line in lines if line.strip() and not line.startswith("#")}

    assert {"open-clip-torch", "segment-anything", "pydensecrf2", "timm", "transformers"} <= names
    assert names.isdisjoint({"torch", "torchvision", "numpy", "simpleitk", "requests"})


def test_icon_is_128_png():
    from PIL import Image

    with Image.open(MODULE / "Resources" / "Icons" / "MedCLIPSAM.png") as icon:
        assert icon.format == "PNG"
        assert icon.size == (128, 128)


@pytest.mark.parametrize(
    "path",
    sorted(MODULE.rglob("*.py")) + sorted((REPOSITORY / "Testing" / "Logic").glob("*.py")),
    ids=lambda path: path.name,
)
def test_python_sources_are_ascii(path):
    path.read_bytes().decode("ascii")


def test_logic_imports_without_qt():
    import MedCLIPSAMModule.batch  # noqa: F401
    import MedCLIPSAMModule.logic  # noqa: F401
    import MedCLIPSAMModule.selftest  # noqa: F401

    assert "qt" not in sys.modules


def test_effect_uses_undo_and_editor_masking():
    source = EFFECT_FILE.read_text(encoding="utf-8")

    assert source.index("saveStateForUndo()") < source.index("modifySelectedSegmentByLabelmap(")
    assert "class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect)" in source


def _function_tables(table):
    for child in table.get_children():
        if child.get_type() == "function":
            yield child
        yield from _function_tables(child)


@pytest.mark.parametrize("path", [MODULE_FILE, EFFECT_FILE], ids=lambda path: path.name)
def test_no_function_rebinds_the_slicer_module(path):
    # "import slicer.packaging" inside a function makes "slicer" local to the whole function. An earlier
    # "slicer.app" in that function then raises UnboundLocalError, which only a running Slicer would show.
    import symtable

    table = symtable.symtable(path.read_text(encoding="utf-8"), str(path), "exec")
    offenders = [
        function.get_name()
        for function in _function_tables(table)
        if "slicer" in function.get_identifiers() and function.lookup("slicer").is_local()
    ]
    assert offenders == []
