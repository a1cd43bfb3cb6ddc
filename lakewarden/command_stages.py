"""Which stage of the policy gate each command asks for, and so which roles may run it.

The gate decides stages, not commands (governance/gate.py): a role may run a command when its
``stages`` in ``policies/roles.yaml`` include the stage the command's library verb asks for —
and then the dataset's access entry, purposes, budget and the kernel's own rules decide the rest.
``COMMAND_STAGES`` says which stages each command asks for, in the order it asks; docs/roles.md
holds the table :func:`render_table` makes from it and the roles file::

    python -m lakewarden.command_stages            # print the table
    python -m lakewarden.command_stages --write    # rewrite it in docs/roles.md

tests/test_command_stages.py keeps both honest: every command is listed, the document's table is
the rendered one, and running each command as a user with no role is refused by the stage
listed first here (``roles/stages/<stage>``) — or, for a command listed as not gated, by none.
"""

from pathlib import Path
from typing import Any

# command -> the stages it asks the gate for, in order; () = not gated (reads no governed values).
COMMAND_STAGES: dict[str, tuple[str, ...]] = {
    "init": (),
    "login": (),
    "logout": (),
    "generate": (),
    "ingest": ("ingest",),
    "silver": ("ingest",),
    "sql": ("query",),
    "policy check": (),
    "policy show": (),
    "policy suggest": (),
    "policy schema": (),
    "gate check": (),
    "audit verify": ("audit",),
    "audit query": ("audit",),
    "audit report": ("audit",),
    "keys new-kek": (),
    "keys status": ("keys",),
    "keys rotate": ("keys",),
    "keys rotate-mask": ("keys",),
    "lineage show": ("lineage",),
    "tables list": (),
    "tables describe": (),
    "tables history": (),
    "tables optimize": ("maintain",),
    "tables vacuum": ("maintain",),
    "tables enforce-retention": ("maintain",),
    "stream": ("ingest",),
    "produce": ("ingest",),
    "broker start": ("maintain",),
    "broker stop": ("maintain",),
    "broker create-topic": ("maintain",),
    "trino up": ("maintain",),
    "trino down": ("maintain",),
    "trino sync": ("maintain",),
    "trino status": (),
    "trino render": (),
    "features apply": ("maintain",),
    "features materialize": ("maintain",),
    "features training-set": ("features",),
    "features online": ("serve",),
    "train": ("features", "train", "evaluate", "register"),
    "privacy status": (),
    "privacy risk": ("query",),
    "models list": (),
    "models show": (),
    "models approve": ("approve",),
    "deploy": ("deploy",),
    "deployments list": (),
    "deployments stop": ("deploy",),
    "serve": ("serve",),
    "monitor": ("serve",),
    "requests erase": ("request",),
    "requests access": ("request",),
    "requests run": ("request",),
    "requests list": ("request",),
    "requests status": ("request",),
    "requests certificate": ("request",),
    "pipeline stage": ("ingest", "features", "train", "evaluate", "register", "deploy"),
    "pipeline render": (),
    "pipeline summary": ("audit",),
    "pipeline trace": (),
    "pipeline checkout": ("maintain",),
}

NOTES: dict[str, str] = {
    "login": "with auth.enabled: the device-code flow (audited: auth.login); the CLI then acts only as the verified user",
    "logout": "deletes this workspace's cached login (audited: auth.logout)",
    "sql": "the role's columns, masks and row filter; `DESCRIBE` too; a `query: private` role: DP aggregates, ε from the privacy ledger",
    "privacy risk": "sees the quasi-identifiers; l only where `evaluate` may open a sensitive column",
    "gate check": "asks the gate the STAGE you name (and audits the answer)",
    "audit verify": "kernel rule builtin/audit-table: compliance_officer only",
    "audit query": "kernel rule builtin/audit-table: compliance_officer only",
    "audit report": "kernel rule builtin/audit-table: compliance_officer only",
    "tables list": "versions, sizes, column classes: no values",
    "tables describe": "versions, sizes, column classes: no values",
    "tables history": "versions, sizes, column classes: no values",
    "features training-set": "for a purpose the dataset and the role allow",
    "features online": "for a purpose the dataset and the role allow",
    "train": "the training set, then the privacy budget; fairness; the card",
    "models approve": "the dataset policy's approvers (deployment.approvers)",
    "deploy": "ε cap, fairness, approvals by someone else",
    "deployments stop": "only predictors this workspace started",
    "requests erase": "kernel rule builtin/requests: compliance_officer only",
    "requests access": "kernel rule builtin/requests: compliance_officer only",
    "requests run": "kernel rule builtin/requests: compliance_officer only",
    "requests list": "kernel rule builtin/requests: compliance_officer only",
    "requests status": "kernel rule builtin/requests: compliance_officer only",
    "requests certificate": "kernel rule builtin/requests: compliance_officer only",
    "pipeline stage": "each stage asks for its own (dvc.yaml runs them as `pipeline`)",
    "pipeline summary": "reads the audit log",
    "models list": "cards: ε, utility, fairness, status",
    "models show": "cards: ε, utility, fairness, status",
}

BEGIN = "<!-- BEGIN command-roles (python -m lakewarden.command_stages --write) -->"
END = "<!-- END command-roles -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "roles.md"
ROLES_FILE = Path(__file__).resolve().parents[1] / "policies" / "roles.yaml"


def stage_roles(roles_file: Path = ROLES_FILE) -> dict[str, list[str]]:
    """stage -> the roles of ``roles_file`` whose ``stages`` include it, in the file's order."""
    import yaml

    doc: dict[str, Any] = yaml.safe_load(roles_file.read_text(encoding="utf-8"))
    out: dict[str, list[str]] = {}
    for role, spec in (doc.get("roles") or {}).items():
        for s in spec.get("stages") or ():
            out.setdefault(str(s), []).append(role)
    return out


def render_table(roles_file: Path = ROLES_FILE) -> str:
    """The Markdown table of docs/roles.md: command, stages, roles that may run it, notes."""
    who = stage_roles(roles_file)
    lines = ["| command | gate stage(s) | roles that may run it | notes |", "| --- | --- | --- | --- |"]
    for cmd, stages in COMMAND_STAGES.items():
        if cmd == "pipeline stage":  # each stage of dvc.yaml asks for its own
            shown_roles, shown_stages = "those of the stage run", ", ".join(f"`{s}`" for s in stages)
        elif stages:
            roles = [r for r in who.get(stages[0], []) if all(r in who.get(s, []) for s in stages)]
            shown_roles = ", ".join(roles) or "none"
            shown_stages = ", ".join(f"`{s}`" for s in stages)
        else:
            shown_roles, shown_stages = "anyone", "not gated"
        lines.append(f"| `lakewarden {cmd}` | {shown_stages} | {shown_roles} | {NOTES.get(cmd, '')} |")
    return "\n".join(lines) + "\n"


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """The table between the markers of a document: command -> {stages, roles, notes}."""
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        cmd = cells[0].strip("`").removeprefix("lakewarden ")
        rows[cmd] = {"stages": cells[1], "roles": cells[2], "notes": cells[3]}
    return rows


def write(doc: Path = DOC) -> bool:
    """Rewrite the table in ``doc``; True if it changed."""
    text = doc.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render_table()}{END}{tail}"
    if new != text:
        doc.write_text(new, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv[1:]:
        print(f"{DOC}: {'rewritten' if write() else 'current'}")
    else:
        sys.stdout.write(render_table())
