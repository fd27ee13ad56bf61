"""The results table as text (aligned columns), Markdown, CSV (a number per column, for
pandas) and LaTeX (booktabs): the rows that groups.py makes, written for a reader or a
paper. torch-free, like plot.py, which prints and writes them (--table, --table-format).
"""
from __future__ import annotations

import pandas as pd

from densenet_trainer.results.groups import IN_MODEL_NAME, SAID_BY_DATA, Row, settings_apart
from densenet_trainer.results.layout import duration

# the table's columns: header and alignment ("r": numbers, "pm": mean ± std)
COLUMNS = {"model": "l", "parameters": "r", "data": "l", "settings": "l", "epochs": "r", "n": "r", "seeds": "l",
           "test error (%)": "pm", "best-val test error (%)": "pm", "top-5 error (%)": "pm",
           "training time": "r", "paper (%)": "r", "difference": "r", "code": "l"}


def row_texts(row: Row, apart: str = "") -> dict[str, str]:
    """``row`` as the printed table shows it, one text per COLUMNS header; ``apart``: what
    sets it apart from the other rows (results.settings_apart)."""
    number = row.numbers(apart)
    unfinished = "" if number["finished"] else " (unfinished)"

    def spread(name: str) -> str:
        mean, std = number[f"{name}_mean"], number[f"{name}_std"]
        return "" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}")

    def optional(value, form: str) -> str:
        return "" if value is None else format(value, form)

    return {
        "model": number["model"], "parameters": optional(number["parameters"], ","),
        "data": number["data"], "settings": apart,
        "epochs": f"{number['epochs']}/{number['planned_epochs']}{unfinished}",
        "n": str(number["n"]), "seeds": ", ".join(number["seeds"].split()),
        "test error (%)": spread("test_error"),
        "best-val test error (%)": spread("best_val_test_error"),
        "top-5 error (%)": spread("top5_error"),
        "training time": duration(number["training_seconds"])
        if number["training_seconds"] is not None else "",
        "paper (%)": optional(number["paper_error"], ".2f"),
        "difference": optional(number["difference"], "+.2f"),
        "code": " ".join(code[:10] + code[40:] for code in number["code"].split()),  # commits shortened
    }


def table(table_rows: list[Row], style: str) -> str:
    """The rows as ``style``: text (aligned columns), markdown, csv (one number per column)
    or latex (booktabs; mean and std aligned at the ±). Columns empty in every row are left
    out, and the code column unless the rows differ in it or a row mixes code. The settings column says what
    sets a row apart from the others beyond its model, data and epochs (settings_apart)."""
    apart = settings_apart(table_rows, IN_MODEL_NAME | SAID_BY_DATA | {"epochs"})
    if style == "csv":  # the same columns whatever the rows hold: empty where unknown
        return pd.DataFrame([row.numbers(text) for row, text in zip(table_rows, apart)]).to_csv(index=False)
    cells = [row_texts(row, text) for row, text in zip(table_rows, apart)]
    columns = [c for c in COLUMNS if any(row[c] for row in cells)
               and (c != "code" or len({row[c] for row in cells}) > 1 or any(" " in row[c] for row in cells))]
    if style == "markdown":
        rule = "|" + "|".join("---" if COLUMNS[c] == "l" else "---:" for c in columns) + "|"
        lines = ["| " + " | ".join(columns) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(row[c].replace("|", "\\|") for c in columns) + " |"
                                  for row in cells]) + "\n"
    if style == "latex":
        return latex(columns, cells)
    widths = [max(len(c), *(len(row[c]) for row in cells)) for c in columns]

    def line(texts: list[str]) -> str:
        return "  ".join(text.ljust(w) if COLUMNS[c] == "l" else text.rjust(w)
                         for text, w, c in zip(texts, widths, columns)).rstrip()

    return "\n".join([line(columns)] + [line([row[c] for c in columns]) for row in cells]) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "%": r"\%", "&": r"\&", "_": r"\_", "#": r"\#",
                 "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "±": r"$\pm$"}


def _tex(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(character, character) for character in text)


def latex(columns: list[str], cells: list[dict[str, str]]) -> str:
    """A booktabs tabular: text left, numbers right, each mean ± std as two cells joined at
    the ± so that the means and the deviations line up."""
    spec = "".join({"l": "l", "r": "r", "pm": "r@{}l"}[COLUMNS[c]] for c in columns)
    header = [rf"\multicolumn{{2}}{{c}}{{{_tex(c)}}}" if COLUMNS[c] == "pm" else _tex(c) for c in columns]
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for row in cells:
        parts = []
        for c in columns:
            if COLUMNS[c] == "pm":
                mean, _, std = row[c].partition(" ± ")
                parts += [mean, rf"${{}}\pm{{}}${std}" if std else ""]
            else:
                parts.append(_tex(row[c]))
        lines.append(" & ".join(parts) + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
