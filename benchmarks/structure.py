"""How lean the reference is: lines per core file against its budget, the offline flags, where each
training loop starts, and the share of each main block that is the algorithm.

    python benchmarks/structure.py            # a table, one row per measure
    python benchmarks/structure.py --json structure.json

The share counts the code lines of a block (no blank lines, comments or docstrings). A line is
infrastructure when it handles arguments, resume, the run folder, seeding, progress bars, printing
or try/except (`INFRASTRUCTURE`), unless it calls the algorithm's own steps (`ALGORITHM`: saving,
evaluation, the learners, the loop header). Everything else (data, networks, updates, evaluation,
saving) is the algorithm.
"""

import ast
import os
import re
import sys
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from eval import check_output_file, fail, markdown_table, write_json  # noqa: E402

# The line budgets of the lean reference (docs/design.md, "Conventions").
BUDGETS = {"uepo_offline.py": 750, "uepo_online.py": 600, "eval.py": 700}
COMPONENTS, TOTAL_BUDGET = ("diffusion.py", "dynamics.py", "divergence.py"), 3200
INFRASTRUCTURE = [
    r"\bfail\(|check_args|check_paths|parse_args|resumed_run|read_offline|\bresumed?\b|restore_loop|set_rng_state",
    r"\bprint\(|tqdm|progress|writer\.|SummaryWriter|means\.|LossMeans|start_run|excepthook",
    r"^\s*(try:|except\b)|random\.seed|np\.random\.seed|torch\.manual_seed|cudnn|torch\.device",
    r"start_time|start_step|steps_per_second|SPS|shown|set_postfix",
]
ALGORITHM = r"write_checkpoint|log_evaluation|evaluate\(|train_td3|train_ppo|for step in"
# Each script's main block: its `if __name__ == "__main__":` block and the learners it calls.
MAIN_BLOCKS = {"uepo_offline.py": ["__main__"], "uepo_online.py": ["__main__", "train_td3", "train_ppo"]}
LOOPS = {"uepo_offline.py": ("__main__", "for step in progress"), "uepo_online.py": ("train_td3", "while global_step")}


@dataclass
class Args:
    json: str | None = None
    """also write the measures to this JSON file"""


def block_lines(source: str, names: list[str]) -> list[str]:
    """The code lines (no blanks, comments or docstrings) of the named functions and the main block."""
    lines, spans = source.split("\n"), []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring
            spans.append((body[0].lineno, node.end_lineno))
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__main__" in names:
            spans.append((node.body[0].lineno, node.end_lineno))
    code = [lines[i - 1] for start, end in spans for i in range(start, end + 1)]
    return [line for line in code if line.strip() and not line.strip().startswith("#")]


def algorithm_share(source: str, names: list[str]) -> tuple[int, float]:
    """(code lines, share that is the algorithm) of a main block, by the rule of the module docstring."""
    code = block_lines(source, names)
    infrastructure = [
        line for line in code if any(re.search(p, line) for p in INFRASTRUCTURE) and not re.search(ALGORITHM, line)
    ]
    return len(code), 1.0 - len(infrastructure) / len(code)


def loop_start(source: str, block: str, marker: str) -> int:
    """How many lines into `block` (a function, or the main block) the line holding `marker` is."""
    lines = source.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {block}(") or f'{block}":' in line)
    return next(i for i in range(start, len(lines)) if marker in lines[i]) - start


def offline_flags(source: str) -> tuple[int, int]:
    """(number of flags, longest one-line help) of uepo_offline.py's Args."""
    start = source.index("class Args:")
    body = source[start : source.index("\n\n\n", start)]
    helps = re.findall(r'^    """(.*)"""', body, re.M)
    return len(re.findall(r"^    \w+: .*=", body, re.M)), max(map(len, helps))


def measure() -> dict:
    sources = {name: open(os.path.join(ROOT, name)).read() for name in [*BUDGETS, *COMPONENTS]}
    lines = {name: source.count("\n") for name, source in sources.items()}
    result = {"lines": lines, "total": sum(lines.values()), "budgets": BUDGETS | {"total": TOTAL_BUDGET}}
    result["offline_flags"], result["longest_help"] = offline_flags(sources["uepo_offline.py"])
    for script, names in MAIN_BLOCKS.items():
        code, share = algorithm_share(sources[script], names)
        result[f"{script}: main block"] = {"code_lines": code, "algorithm_share": round(share, 3)}
        result[f"{script}: loop starts"] = loop_start(sources[script], *LOOPS[script])
    return result


if __name__ == "__main__":
    args = tyro.cli(Args)
    if (problem := check_output_file("--json", args.json)) is not None:
        fail(problem)
    result = measure()
    rows = [[name, count, BUDGETS.get(name, "")] for name, count in result["lines"].items()]
    rows += [["six core files", result["total"], TOTAL_BUDGET]]
    rows += [["offline flags (longest help)", f"{result['offline_flags']} ({result['longest_help']} chars)", "45 (80)"]]
    for script in MAIN_BLOCKS:
        block = result[f"{script}: main block"]
        share = f"{100 * block['algorithm_share']:.0f}% of {block['code_lines']} code lines"
        rows += [[f"{script}: algorithm share of the main block", share, ">= 60%"]]
        rows += [[f"{script}: the loop starts, lines into its block", result[f"{script}: loop starts"], "about 60"]]
    print(markdown_table(["measure", "now", "budget"], rows))
    if args.json:
        write_json(args.json, result)
