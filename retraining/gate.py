"""The gate: a candidate is published only if it retrieves about as well as the served model.

Place in the data flow: between evaluation and embedding in the retraining pipeline (the role
of TFX's Evaluator blessing, checked before its Pusher). The evaluate step measures the
candidate and the served model on the same held-out split (`trainer.evaluate`, exact search
over the whole corpus, recall with ties broken at random in expectation: `ebr.recall`) and
writes `RUN/evaluation.json`; from that report this module decides

    candidate recall@k >= served recall@k - tolerance        (no served model yet: passes)

and renders what Vertex AI and Kubeflow display: the metrics (`metrics`, logged to a KFP
`Metrics` artifact: both models' recall at every cut-off, the delta at k, the decision) and an
HTML page with the recall@K curves as an embedded PNG (`plot_html`). The gate step raises
`failure_message` when the decision is no, so the run stops before anything is embedded.
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io

from retraining.config import GateConfig


@dataclasses.dataclass
class Decision:
    passed: bool
    k: int
    candidate: float
    served: float | None  # None: no served model to compare with
    tolerance: float

    @property
    def delta(self) -> float | None:
        return None if self.served is None else self.candidate - self.served

    @property
    def threshold(self) -> float:
        return 0.0 if self.served is None else self.served - self.tolerance


def _recall(model: dict, k: int) -> float:
    return float(model["recall"][str(k)])


def decide(report: dict, gate: GateConfig) -> Decision:
    """The gate's decision on an evaluation report (see the module doc)."""
    k = int(gate.k)
    candidate = _recall(report["candidate"], k)
    served = _recall(report["served"], k) if report.get("served") else None
    passed = served is None or candidate >= served - gate.tolerance
    return Decision(passed, k, candidate, served, float(gate.tolerance))


def split_text(report: dict) -> str:
    """The held-out split both models were measured on, in one phrase."""
    split = report["split"]
    how = split.get("description") or {}
    # the split's parameters (split.json); its prose fields ("rule", "history") stay in the file
    params = ", ".join(f"{k}={v}" for k, v in sorted(how.items())
                       if k not in ("split_file", "rule", "history"))
    pattern = split["eval_pattern"].removeprefix(split["examples"].rstrip("/") + "/")
    return (f"the held-out split of {split['examples']} ({split['examples_count']} examples in "
            f"{pattern}{'; ' + params if params else ''}; protocol {report['protocol']})")


def summary(report: dict, decision: Decision) -> str:
    """One line for the log and the step's output."""
    cand = report["candidate"]
    if decision.served is None:
        return (f"gate passed: no served model under {report['model_dir']} to compare with; the "
                f"candidate (version {cand['version']}) has recall@{decision.k} = "
                f"{decision.candidate:.4f} on {split_text(report)}")
    served = report["served"]
    verdict = "passed" if decision.passed else "failed"
    return (f"gate {verdict}: candidate (version {cand['version']}) recall@{decision.k} = "
            f"{decision.candidate:.4f}, served model (version {served['version']}) "
            f"{decision.served:.4f}, tolerance {decision.tolerance:.4f} (threshold "
            f"{decision.threshold:.4f}), on {split_text(report)}")


def failure_message(report: dict, decision: Decision) -> str:
    """The gate step's error: the step, both numbers, the tolerance and the split."""
    return (f"gate step: the candidate (version {report['candidate']['version']}) reaches "
            f"recall@{decision.k} = {decision.candidate:.4f}, below the served model's (version "
            f"{report['served']['version']}) {decision.served:.4f} minus the tolerance "
            f"{decision.tolerance:.4f} (= {decision.threshold:.4f}), on {split_text(report)}; "
            f"the run stops before embedding and nothing is published")


def metrics(report: dict, decision: Decision) -> dict[str, float]:
    """Metric name -> value, as logged to the KFP Metrics artifact."""
    out: dict[str, float] = {}
    for k in report["ks"]:
        out[f"candidate_recall_at_{k}"] = _recall(report["candidate"], k)
        if report.get("served"):
            out[f"served_recall_at_{k}"] = _recall(report["served"], k)
    out["gate_k"] = float(decision.k)
    out["gate_tolerance"] = decision.tolerance
    if decision.delta is not None:
        out[f"gate_delta_recall_at_{decision.k}"] = decision.delta
    out["gate_passed"] = 1.0 if decision.passed else 0.0
    out["gate_has_served_model"] = 0.0 if decision.served is None else 1.0
    return out


def plot_png(report: dict, decision: Decision) -> bytes:
    """Recall@K curves of both models (log K axis), the gate's cut-off and threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in report["ks"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        ax.plot(ks, [_recall(report["candidate"], k) for k in ks], "o-",
                label=f"candidate (v{report['candidate']['version']})")
        if report.get("served"):
            ax.plot(ks, [_recall(report["served"], k) for k in ks], "s--",
                    label=f"served (v{report['served']['version']})")
            ax.plot([decision.k], [decision.threshold], "v", color="red",
                    label=f"gate threshold @{decision.k} (served - {decision.tolerance:g})")
        ax.axvline(decision.k, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel(f"recall@K ({report['protocol']})")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        ax.set_title("gate " + ("passed" if decision.passed else "failed")
                     + (" (no served model)" if decision.served is None else ""))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
        return buf.getvalue()
    finally:
        plt.close(fig)


def plot_html(report: dict, decision: Decision) -> str:
    """A self-contained HTML page (KFP's HTML artifact): the plot, the numbers, the decision."""
    png = base64.b64encode(plot_png(report, decision)).decode("ascii")
    rows = []
    for k in report["ks"]:
        served = f"{_recall(report['served'], k):.4f}" if report.get("served") else "-"
        rows.append(f"<tr><td>{k}</td><td>{_recall(report['candidate'], k):.4f}</td>"
                    f"<td>{served}</td></tr>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>gate</title></head><body>"
            f"<h3>{html.escape(summary(report, decision))}</h3>"
            f"<img alt='recall@K' src='data:image/png;base64,{png}'/>"
            # the evaluation's `protocols` (trainer.evaluate): ebr.recall's tie rule
            "<p>recall with ties broken at random in expectation</p>"
            "<table border='1' cellpadding='4'><tr><th>K</th><th>candidate</th><th>served</th></tr>"
            + "".join(rows) + "</table></body></html>")
