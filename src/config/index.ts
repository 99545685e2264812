// The experiment config: schema, types and loading. Import from here.
export * from "./schema.ts";
export { ConfigError, applyOverrides, loadConfig, parseConfigText, resolveConfig, type ConfigIssue } from "./load.ts";
