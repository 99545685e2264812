// Errors a run reports. Each names the rank(s) it is about.
import type { RemoteError } from "./protocol.ts";

/** A rank died, hung, disconnected or could not start: the run cannot continue. */
export class RankFailure extends Error {
  constructor(
    message: string,
    readonly rank: number,
    readonly kind: "exited" | "unresponsive" | "disconnected" | "startup" | "join-timeout" | "rejected" | "left",
    readonly details: { pid?: number; code?: number | null; signal?: string | null; stderr?: string[]; traceback?: string } = {},
  ) {
    super(message);
    this.name = "RankFailure";
  }
}

/** A command raised on one or more ranks; the ranks themselves are still healthy. */
export class CommandError extends Error {
  constructor(readonly command: string, readonly errors: Array<{ rank: number } & RemoteError>) {
    super(
      errors
        .map((e) => `rank ${e.rank}: command '${command}' raised ${e.type}: ${e.message}` +
          (e.traceback ? `\n${indent(e.traceback.trimEnd())}` : ""))
        .join("\n"),
    );
    this.name = "CommandError";
  }
}

/**
 * A command's result does not have the shape its schema says: the TypeScript and Python sides
 * disagree about the command (a contract changed on one side only, or two checkouts mixed).
 * Names the rank, the command and each field at fault.
 */
export class ResultError extends Error {
  constructor(readonly command: string, readonly rank: number, readonly issues: string[]) {
    super(`rank ${rank}: command '${command}' returned a result of another shape than ampipe's TypeScript side ` +
      `expects (are both sides from one checkout?):\n${issues.map((i) => indent(i)).join("\n")}`);
    this.name = "ResultError";
  }
}

export function indent(text: string, prefix = "    "): string {
  return text.split("\n").map((l) => prefix + l).join("\n");
}

/** The run was closed (by the caller, or on SIGINT/SIGTERM) while a request was pending. */
export class RunClosedError extends Error {
  constructor(what: string) {
    super(`the run was closed while ${what} was pending`);
    this.name = "RunClosedError";
  }
}

/** The controller could not be set up (an address refused or already in use). */
export class BridgeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "BridgeError";
  }
}
