"""The GitHub Actions workflows in .github/workflows, and .dockerignore.

GitHub's own schema (SchemaStore's, vendored by check-jsonschema: no network) catches misspelled
keys and wrong types; the rest are rules the schema cannot see: no `${{ ... }}` of untrusted or
secret values inside a `run:` script (script injection), the CI workflow runs `.ci/run`, the push
workflow takes the model as an input and pushes through cog-safe-push, and `.dockerignore` keeps
what the image needs while leaving out what it does not.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = ROOT / ".github" / "workflows"
WORKFLOWS = sorted([*WORKFLOWS_DIR.glob("*.yaml"), *WORKFLOWS_DIR.glob("*.yml")])
CI = WORKFLOWS_DIR / "ci.yaml"
PUSH = WORKFLOWS_DIR / "push.yaml"

# `${{ ... }}` expressions that must reach a `run:` script through `env:` only: workflow inputs and
# event payloads are attacker-controlled text, and a secret in a script ends up in its command lines.
UNSAFE_IN_RUN = re.compile(r"\$\{\{[^}]*\b(inputs\.|github\.event\.|github\.head_ref|secrets\b)")
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
SECRET_REFERENCE = re.compile(r"secrets\.[A-Za-z_][A-Za-z0-9_]*")
PROJECT_SCRIPT = re.compile(r"(?<![\w./-])((?:\.ci|script)/[\w.-]+)")


def check_jsonschema(*arguments: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *map(str, arguments)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    """The `on:` mapping (PyYAML reads the bare key `on` as the boolean true, as YAML 1.1 says)."""
    value = workflow["on"] if "on" in workflow else workflow[True]
    return {name: None for name in value} if isinstance(value, list) else value


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def unsafe_run_scripts(workflow: dict) -> list[str]:
    """`name: script` of every step whose `run:` interpolates an input, event field or secret."""
    return [
        f"{step.get('name', step['run'][:40])}: {step['run']}"
        for step in steps(workflow)
        if "run" in step and UNSAFE_IN_RUN.search(step["run"])
    ]


def test_there_are_workflows():
    assert {CI, PUSH} <= set(WORKFLOWS)


# --- GitHub's workflow schema ------------------------------------------------------------------


def test_workflows_match_githubs_schema():
    result = check_jsonschema("--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_job_has_a_timeout():
    result = check_jsonschema("--builtin-schema", "custom.github-workflows-require-timeout", *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (("runs-on:", "run-on:"), "runs-on"),  # a misspelled required key
        (("timeout-minutes: 45", "timeout-minutes: soon"), "timeout-minutes"),  # a wrong type
        (("  pull_request:", "  pull-request:"), "pull-request"),  # an unknown event
    ],
)
def test_the_schema_check_rejects_a_broken_workflow(tmp_path, broken, expected):
    text = CI.read_text()
    old, new = broken
    assert old in text
    bad = tmp_path / "ci.yaml"
    bad.write_text(text.replace(old, new, 1))
    result = check_jsonschema("--builtin-schema", "vendor.github-workflows", "--verbose", bad)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr


# --- rules the schema cannot see ---------------------------------------------------------------


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_no_run_script_interpolates_inputs_events_or_secrets(path):
    assert unsafe_run_scripts(load(path)) == []


@pytest.mark.parametrize(
    "script",
    [
        "cog-safe-push ${{ inputs.model }}",
        "echo '${{ github.event.pull_request.title }}'",
        "git checkout ${{github.head_ref}}",
        "echo ${{ secrets.REPLICATE_API_TOKEN }} | cog login --token-stdin",
        "echo ${{ toJSON(secrets) }}",
    ],
)
def test_the_injection_rule_finds_interpolated_scripts(script):
    workflow = {"jobs": {"job": {"steps": [{"name": "step", "run": script}]}}}
    assert unsafe_run_scripts(workflow) == [f"step: {script}"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_secrets_are_read_only_as_secrets_dot_name_into_env(path):
    workflow = load(path)
    in_env = {
        value
        for scope in [workflow, *workflow["jobs"].values(), *steps(workflow)]
        for value in (scope.get("env") or {}).values()
        if isinstance(value, str)
    }
    for expression in EXPRESSION.findall(path.read_text()):
        if "secrets" in expression:
            assert SECRET_REFERENCE.fullmatch(expression), expression
            assert f"${{{{ {expression} }}}}" in in_env, f"{expression} outside an env: value"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_project_scripts_that_workflows_run_exist_and_are_executable(path):
    for step in steps(load(path)):
        for script in PROJECT_SCRIPT.findall(step.get("run", "")):
            assert os.access(ROOT / script, os.X_OK), f"{path.name} runs {script}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflows_may_only_read_the_repository(path):
    assert load(path)["permissions"] == {"contents": "read"}


def test_ci_runs_the_projects_entry_point_on_every_push_and_pull_request():
    workflow = load(CI)
    assert {"push", "pull_request"} <= set(triggers(workflow))
    assert workflow["concurrency"]["cancel-in-progress"] is True
    assert "github.ref" in workflow["concurrency"]["group"]
    assert [step["run"] for step in steps(workflow) if "run" in step] == [".ci/run"]
    setup_python = next(step for step in steps(workflow) if step.get("uses", "").startswith("actions/setup-"))
    assert setup_python["with"]["python-version"] == "3.11"
    assert setup_python["with"]["cache"] == "pip"
    assert set(setup_python["with"]["cache-dependency-path"].split()) == {
        "requirements.txt",
        "requirements-dev.txt",
    }


def test_push_takes_the_model_and_pushes_through_cog_safe_push():
    workflow = load(PUSH)
    dispatch = triggers(workflow)
    assert set(dispatch) == {"workflow_dispatch"}
    inputs = dispatch["workflow_dispatch"]["inputs"]
    assert inputs["model"]["required"] is True and inputs["model"]["type"] == "string"
    assert inputs["test_model"].get("required", False) is False
    safe_push = [
        step for step in steps(workflow) if re.search(r"^\s*cog-safe-push ", step.get("run", ""), re.M)
    ]
    assert len(safe_push) == 1
    step = safe_push[0]
    assert "--config cog-safe-push.yaml" in step["run"]
    assert (ROOT / "cog-safe-push.yaml").is_file()
    assert step["env"]["MODEL"] == "${{ inputs.model }}"
    assert step["env"]["TEST_MODEL"] == "${{ inputs.test_model }}"
    assert step["env"]["REPLICATE_API_TOKEN"] == "${{ secrets.REPLICATE_API_TOKEN }}"
    assert step["env"]["ANTHROPIC_API_KEY"] == "${{ secrets.ANTHROPIC_API_KEY }}"
    runs = [step.get("run", "") for step in steps(workflow)]
    assert any("cog login --token-stdin" in run for run in runs)
    assert any("script/download-weights" in run for run in runs)
    assert not any(re.search(r"\bcog push\b", run) for run in runs), "cog-safe-push does the push"


# --- .dockerignore -----------------------------------------------------------------------------


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per line, as Docker reads .dockerignore (moby/patternmatcher)."""
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        assert "[" not in pattern and "\\" not in pattern, f"unsupported here: {line}"
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((excludes, re.compile(regex + r"\Z")))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching the path or
    one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for excludes, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            result = excludes
    return result


@pytest.fixture(scope="module")
def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore_patterns((ROOT / ".dockerignore").read_text())


def test_the_dockerignore_matcher_follows_dockers_rules():
    patterns = dockerignore_patterns("tests\n**/__pycache__\n*.log\ndocs\n!docs/keep.md\n/output\n")
    assert ignored("tests/test_x.py", patterns)
    assert not ignored("sdcog/tests/x.py", patterns)  # no `**/`: the top level only
    assert ignored("sdcog/__pycache__/engine.cpython-311.pyc", patterns)
    assert ignored("a.log", patterns) and not ignored("logs/a.log", patterns)
    assert ignored("docs/bench/a.json", patterns) and not ignored("docs/keep.md", patterns)
    assert ignored("output/0.png", patterns)


def runtime_files() -> list[str]:
    """What the container runs: cog.yaml, the predictor and its requirements, every file of the
    project's own packages that predict.py imports, and the bundled model."""
    cog = load(ROOT / "cog.yaml")
    predict_file = cog["predict"].split(":")[0]
    files = ["cog.yaml", predict_file, cog["build"]["python_requirements"]]
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse((ROOT / predict_file).read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0)
        for alias in node.names
    }
    packages = sorted(name for name in imported if (ROOT / name / "__init__.py").is_file())
    assert "sdcog" in packages
    for directory in [*packages, "models"]:
        files += [
            path.relative_to(ROOT).as_posix()
            for path in (ROOT / directory).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        ]
    return files


def test_dockerignore_keeps_what_the_container_runs(dockerignore):
    files = runtime_files()
    assert "sdcog/generate/engine.py" in files and "models/shapes-sd/model_index.json" in files
    # weights/ goes into the image; Cog's build files in .cog/tmp are copied from the context.
    files += ["weights/model_index.json", "weights/unet/config.json", ".cog/tmp/build1/cog-0.0.1.whl"]
    assert [path for path in files if ignored(path, dockerignore)] == []


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "sdcog_tools/bench.py",
        ".github/workflows/ci.yaml",
        "tests/test_workflows.py",
        "sdcog/__pycache__/engine.cpython-311.pyc",
        ".cache/bench/tiny-sd15/model_index.json",
        ".pytest_cache/README.md",
        "bench/bench-tiny-sd15-cpu.json",
        "docs/bench/h100-2026-11-23/sd15-eager.json",
        "output/out-0.webp",
        ".exp/after.py",
        "release/published-schema.json",
        "deploy/kubernetes.yaml",
    ],
)
def test_dockerignore_leaves_out_development_files(dockerignore, path):
    assert ignored(path, dockerignore)
