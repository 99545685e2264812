// The bridge between the TypeScript controller and the Python ranks (docs/bridge.md).
export { launchRanks, attachRanks, closeOnSignals, RankRun, type LaunchOptions, type AttachOptions, type RunOptions } from "./run.ts";
export { Controller, checkBindAddress, type ControllerOptions, type RankEvent, type RankInfo, type RankStats } from "./controller.ts";
export { BridgeError, RankFailure, CommandError, ResultError, RunClosedError } from "./errors.ts";
export { anyNumber, checkResult, msById, opTimesMs } from "./results.ts";
export { ProtocolError, PROTOCOL_VERSION, DEFAULT_MAX_MESSAGE_BYTES } from "./protocol.ts";
export { encode, decode, decodeValue } from "./codec.ts";
export { freePort, RankProcess } from "./launcher.ts";
