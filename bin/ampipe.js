#!/usr/bin/env node
// The `ampipe` CLI: runs src/cli.ts through tsx, so no build step is needed.
import { register } from "tsx/esm/api";

register();
await import(new URL("../src/cli.ts", import.meta.url).href);
