// summary.md helpers shared by the reports: GitHub-flavoured tables, headings, goal lines.
import { formatCell } from "./html.ts";

/** A GitHub-flavoured markdown table; cells are formatted like the HTML tables and `|` is escaped. */
export function mdTable(headers: string[], rows: unknown[][], align?: Array<"left" | "right">): string {
  const cell = (v: unknown) => (typeof v === "string" ? v : formatCell(v)).replace(/\|/g, "\\|").replace(/\n/g, " ");
  const sep = headers.map((_, i) => ((align?.[i] ?? (i === 0 ? "left" : "right")) === "left" ? "---" : "---:"));
  return [headers, sep, ...rows.map((r) => r.map(cell))].map((r) => `| ${r.join(" | ")} |`).join("\n") + "\n";
}

export interface Goal {
  name: string;
  /** null: could not be judged (say why in `detail`). */
  met: boolean | null;
  detail: string;
}

/** One line per goal: MET / MISSED / NOT JUDGED, with the numbers behind it. */
export function mdGoals(goals: Goal[]): string {
  return goals.map((g) => `- **${g.met === null ? "NOT JUDGED" : g.met ? "MET" : "MISSED"}** — ${g.name}: ${g.detail}`).join("\n") + "\n";
}

export const pct = (x: number, digits = 1) => `${(100 * x).toFixed(digits)}%`;
export const times = (x: number, digits = 3) => `${x.toFixed(digits)}x`;
