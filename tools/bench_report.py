"""The benchmark's output: every figure for the console, JSON and Markdown, and each goal's verdict."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Report:
    """Collects every figure for the console, JSON and markdown, and the goal verdicts."""

    results: dict = field(default_factory=dict)
    goals: list[dict] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def section(self, title: str) -> None:
        self.say()
        self.say(f"== {title}")

    def goal(self, name: str, value: float, goal: str, met: bool, shown: str) -> None:
        verdict = "met" if met else "NOT met"
        self.goals.append({"figure": name, "value": value, "shown": shown, "goal": goal, "met": met})
        self.say(f"   {name}: {shown}   goal {goal}: {verdict}")

    def markdown(self) -> str:
        rows = [
            f"| {g['figure']} | {g['shown']} | {g['goal']} | {'met' if g['met'] else '**NOT met**'} |"
            for g in self.goals
        ]
        head = ["| figure | measured | goal | verdict |", "| --- | --- | --- | --- |"]
        body = "\n".join(head + rows)
        log = "\n".join(self.lines)
        return f"{body}\n\nFull output of the run:\n\n```text\n{log}\n```\n"
