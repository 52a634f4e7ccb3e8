"""The `metaembed` command: what users do with MetaEmbed from a shell.

    metaembed encode MODEL INPUTS OUTPUT [--role query|candidate] [--num-vectors K] [--reasoner R|self]
    metaembed score QUERIES CANDIDATES [--budget R_Q R_C] [--top-k K] [--output FILE]
    metaembed card CHECKPOINT [--results FILE] [--repo-id ID] ...
    metaembed publish CHECKPOINT --repo-id ORG/NAME [--private] [--revision R] [--create-pr] [--dry-run DIR]
    metaembed convert OFFICIAL OUTPUT [--base BASE] [--num-query-vectors 16] [--num-candidate-vectors 64]
    metaembed index SOURCE INDEX [--model MODEL] [--num-vectors R_C] [--precision bfloat16] [--append]
    metaembed search INDEX QUERIES [--model MODEL] [--budget R_Q R_C] [--top-k K] [--shortlist S] [--mmap]
    metaembed evaluate {mmeb,vidore} MODEL --data SOURCE [--budgets R_Q R_C ...] [--output DIR]

Exit codes: 0 success; 1 the work failed (an upload error, a conversion that does not reproduce the official
embeddings, an unexpected error); 2 bad arguments or bad input, with a one-line message on stderr that names
the offending file, line or item.
"""

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class CommandFailed(RuntimeError):
    """The command could not do its work although its input was valid (exit code 1)."""


def _load_model(path: str, device: str | None, dtype: str | None):
    import torch

    from modeling_metaembed import MetaEmbedModel

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = MetaEmbedModel.from_pretrained(path, **kwargs)
    if model.processor is None:
        raise ValueError(f"{path}: the checkpoint has no processor files")
    return model.to(device) if device else model


def run_encode(args) -> None:
    from .files import read_inputs, save_embeddings

    ids, items = read_inputs(args.inputs)
    model = _load_model(args.model, args.device, args.dtype)
    reasoning = {}
    if args.reasoner:  # Think-Then-Embed: traces from a generative checkpoint, or the model's own backbone
        from modeling_metaembed.reasoning_metaembed import GenerativeReasoner

        settings = {"max_new_tokens": args.max_new_tokens}
        reasoning["reasoner"] = (model.as_reasoner(**settings) if args.reasoner == "self" else
                                 GenerativeReasoner.from_pretrained(args.reasoner, device=args.device, **settings))  # fmt: skip
        reasoning["trace_cache"] = args.trace_cache
    embeddings = model.encode(
        items, num_vectors=args.num_vectors, role=args.role, instruction=args.instruction,
        batch_size=args.batch_size, show_progress_bar=not args.quiet, **reasoning,
    )
    save_embeddings(args.output, embeddings, ids, args.role, args.model, args.precision)
    if not args.quiet:
        print(f"wrote {len(ids)} x {tuple(embeddings.shape[1:])} {args.role} embeddings to {args.output}", file=sys.stderr)


def run_score(args) -> None:
    import torch

    from modeling_metaembed import maxsim

    from .files import load_embeddings

    queries, query_ids, query_meta = load_embeddings(args.queries)
    candidates, candidate_ids, candidate_meta = load_embeddings(args.candidates)
    if query_meta.get("role") != "query":
        raise ValueError(f"{args.queries}: holds {query_meta.get('role')} embeddings; encode queries with --role query")
    if candidate_meta.get("role") != "candidate":
        raise ValueError(f"{args.candidates}: holds {candidate_meta.get('role')} embeddings; encode with --role candidate")
    if queries.shape[-1] != candidates.shape[-1]:
        raise ValueError(f"dimension mismatch: queries have D={queries.shape[-1]}, candidates D={candidates.shape[-1]}")
    budget = tuple(args.budget) if args.budget else None
    if args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    k = min(args.top_k, len(candidate_ids))
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for start in range(0, len(query_ids), args.query_batch):
            scores = maxsim(queries[start : start + args.query_batch], candidates, budget=budget)
            top = torch.topk(scores, k, dim=1)
            for row, query_id in enumerate(query_ids[start : start + args.query_batch]):
                hits = [{"id": candidate_ids[i], "score": round(float(s), 6)} for s, i in zip(top.values[row], top.indices[row])]
                out.write(json.dumps({"query_id": query_id, "results": hits}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def _card_kwargs(args) -> dict:
    kwargs = {"license": args.license, "base_model": args.base_model, "datasets": args.dataset or None}
    if args.model_name:
        kwargs["model_name"] = args.model_name
    return kwargs


def run_card(args) -> None:
    from model_cards import write_model_card

    kwargs = _card_kwargs(args)
    if args.repo_id:
        kwargs["repo_id"] = args.repo_id
    path = write_model_card(args.checkpoint, args.results, **kwargs)
    print(f"wrote {path}", file=sys.stderr)


def run_publish(args) -> None:
    from .hub import publish

    staged, commit = publish(
        args.checkpoint, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
        commit_message=args.commit_message, dry_run_dir=args.dry_run, results=args.results, **_card_kwargs(args),
    )
    if staged is not None:
        print(f"dry run: the folder that would be uploaded to {args.repo_id} is {staged}", file=sys.stderr)
    else:
        print(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit))


def run_convert(args) -> None:
    from .convert import ConversionError, convert

    try:
        difference = convert(
            args.official, args.output, num_query_vectors=args.num_query_vectors,
            num_candidate_vectors=args.num_candidate_vectors, base=args.base, verify=not args.no_verify,
            tolerance=args.tolerance,
        )
    except ConversionError as error:
        if "differ from the official forward" in str(error):
            raise CommandFailed(str(error)) from error
        raise
    note = "not verified" if difference is None else f"max |official - converted| = {difference:.2e}"
    print(f"wrote {args.output} ({note})", file=sys.stderr)


def _embeddings_or_encoded(path: str, model_path: str | None, role: str, args) -> tuple:
    """(embeddings, ids) of `path`: an embeddings file written by `metaembed encode` with this role, or, with
    --model, inputs (.jsonl, .txt, a folder of images) encoded here."""
    from .files import load_embeddings, read_inputs

    if model_path is None:
        embeddings, ids, metadata = load_embeddings(path)
        if metadata.get("role") != role:
            raise ValueError(f"{path}: holds {metadata.get('role')} embeddings, expected {role} embeddings "
                             f"(or give --model to encode inputs)")  # fmt: skip
        return embeddings, ids
    ids, items = read_inputs(path)
    model = _load_model(model_path, args.device, None)
    embeddings = model.encode(items, role=role, batch_size=args.batch_size, show_progress_bar=not args.quiet)
    return embeddings, ids


def run_index(args) -> None:
    from .index import MetaEmbedIndex

    embeddings, ids = _embeddings_or_encoded(args.source, args.model, "candidate", args)
    if args.append:
        index = MetaEmbedIndex.load(args.index)
    else:
        if Path(args.index, "index.json").exists():
            raise ValueError(f"{args.index}: an index is already there; pass --append to add to it")
        num_vectors = args.num_vectors or embeddings.shape[1]
        index = MetaEmbedIndex(dim=embeddings.shape[-1], num_vectors=num_vectors, dtype=args.precision)
    index.add(embeddings, ids=ids)
    index.save(args.index)
    if not args.quiet:
        print(f"wrote {args.index}: {index}", file=sys.stderr)


def run_search(args) -> None:
    from .index import MetaEmbedIndex

    index = MetaEmbedIndex.load(args.index, mmap=args.mmap)
    queries, query_ids = _embeddings_or_encoded(args.queries, args.model, "query", args)
    budget = tuple(args.budget) if args.budget else None
    if args.top_k < 1:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    k = min(args.top_k, len(index))
    if args.shortlist:
        found = index.search_two_stage(queries, budget=budget, k=k, shortlist=args.shortlist)
    else:
        found = index.search(queries, budget=budget, k=k)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for query_id, ids, scores in zip(query_ids, found.ids, found.scores.tolist()):
            hits = [{"id": i, "score": round(s, 6)} for i, s in zip(ids, scores)]
            out.write(json.dumps({"query_id": query_id, "results": hits}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def run_evaluate(args) -> None:
    from .evals import mmeb, vidore, write_report

    if args.budgets and len(args.budgets) % 2:
        raise ValueError(f"--budgets takes pairs R_Q R_C, got {len(args.budgets)} numbers")
    budgets = [tuple(args.budgets[i : i + 2]) for i in range(0, len(args.budgets), 2)] if args.budgets else None
    model = _load_model(args.model, args.device, args.dtype)
    options = {"batch_size": args.batch_size, "show_progress_bar": not args.quiet}
    if budgets:
        options["budgets"] = budgets
    if args.benchmark == "mmeb":
        results = mmeb.evaluate(model, tasks=args.tasks, source=args.data or mmeb.SOURCE, image_root=args.images,
                                limit=args.limit, **options)  # fmt: skip
        table = mmeb.markdown(results)
    else:
        datasets = args.tasks or args.data or "v2"  # data set sources, or the name of a whole benchmark
        results = vidore.evaluate(model, datasets, language=args.language, **options)
        table = vidore.markdown(results)
    results["model"] = args.model
    write_report(results, table, args.output)
    print(table, end="")
    if not args.quiet:
        print(f"wrote {Path(args.output) / 'results.json'} and results.md", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaembed", description="MetaEmbed multi-vector retrieval: encode, score, publish, convert.",
        epilog="Exit codes: 0 success, 1 the work failed, 2 bad arguments or input.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    encode = commands.add_parser("encode", help="embed a .jsonl/.txt file or a folder of images into an embeddings file")
    encode.add_argument("model", help="MetaEmbed checkpoint folder or Hub id")
    encode.add_argument("inputs", help=".jsonl ({'id','text','image'} per line), .txt (one text per line) or a folder of images")
    encode.add_argument("output", help="embeddings file to write (.safetensors)")
    encode.add_argument("--role", choices=("query", "candidate"), default="candidate")
    encode.add_argument("--num-vectors", type=int, default=None, help="keep the first K vectors (default: all)")
    encode.add_argument("--instruction", default=None, help="replace the role's default instruction")
    encode.add_argument("--batch-size", type=int, default=8)
    encode.add_argument("--precision", choices=("float32", "bfloat16", "float16"), default="float32", help="stored dtype")
    encode.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cpu)")
    encode.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype")
    encode.add_argument("--reasoner", default=None, help="Think-Then-Embed: a generative checkpoint, or 'self' (the "
                        "model's own backbone), writes a trace embedded with each input")
    encode.add_argument("--trace-cache", default=None, help="folder keeping the reasoner's traces (reused across runs)")
    encode.add_argument("--max-new-tokens", type=int, default=128, help="trace length limit for --reasoner")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.set_defaults(run=run_encode)

    score = commands.add_parser("score", help="MaxSim top-k of each query over the candidates, as JSON lines")
    score.add_argument("queries", help="embeddings file written with --role query")
    score.add_argument("candidates", help="embeddings file written with --role candidate")
    score.add_argument("--budget", type=int, nargs=2, metavar=("R_Q", "R_C"), help="retrieval budget (default: all)")
    score.add_argument("--top-k", type=int, default=10)
    score.add_argument("--query-batch", type=int, default=256, help="queries scored at once")
    score.add_argument("--output", default=None, help="JSON-lines file (default: stdout)")
    score.set_defaults(run=run_score)

    def card_options(command):
        command.add_argument("--results", default=None, help="evaluation results file (default: the checkpoint's eval_results.json)")
        command.add_argument("--license", default=None)
        command.add_argument("--base-model", default=None, help="Hub id of the backbone")
        command.add_argument("--dataset", action="append", help="Hub id of a training data set (repeatable)")
        command.add_argument("--model-name", default=None)

    card = commands.add_parser("card", help="render the model card (README.md and the budget plot) into a checkpoint")
    card.add_argument("checkpoint")
    card.add_argument("--repo-id", default=None, help="the Hub id shown in the usage snippets")
    card_options(card)
    card.set_defaults(run=run_card)

    publish = commands.add_parser("publish", help="upload a checkpoint, with its rendered card, to the Hub")
    publish.add_argument("checkpoint")
    publish.add_argument("--repo-id", required=True, help="org/name")
    publish.add_argument("--private", action="store_true", default=None)
    publish.add_argument("--revision", default=None, help="branch to upload to (created if missing)")
    publish.add_argument("--create-pr", action="store_true")
    publish.add_argument("--commit-message", default=None)
    publish.add_argument("--dry-run", metavar="DIR", default=None, help="write the exact upload folder to DIR, upload nothing")
    card_options(publish)
    publish.set_defaults(run=run_publish)

    convert = commands.add_parser("convert", help="convert an official MetaEmbed checkpoint (or LoRA adapter) to this format")
    convert.add_argument("official", help="official checkpoint folder, LoRA adapter folder, or Hub id")
    convert.add_argument("output", help="folder to write (must not exist or be empty)")
    convert.add_argument("--base", default=None, help="base model of a LoRA adapter (default: its base_model_name_or_path)")
    convert.add_argument("--num-query-vectors", type=int, default=16, help="R_q the checkpoint was trained with")
    convert.add_argument("--num-candidate-vectors", type=int, default=64, help="R_c the checkpoint was trained with")
    convert.add_argument("--no-verify", action="store_true", help="skip comparing with the official forward")
    convert.add_argument("--tolerance", type=float, default=1e-4)
    convert.set_defaults(run=run_convert)

    index = commands.add_parser("index", help="build (or --append to) a saved MetaEmbedIndex from candidates")
    index.add_argument("source", help="candidate embeddings file (metaembed encode), or inputs to encode with --model")
    index.add_argument("index", help="index folder to write (vectors.safetensors + index.json)")
    index.add_argument("--model", default=None, help="encode SOURCE (.jsonl, .txt, images folder) with this checkpoint")
    index.add_argument("--num-vectors", type=int, default=None, help="R_c vectors kept per item (default: all given)")
    index.add_argument("--precision", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    index.add_argument("--append", action="store_true", help="add to the index already in INDEX")

    search = commands.add_parser("search", help="top-k of each query in a saved index, as JSON lines")
    search.add_argument("index", help="index folder written by `metaembed index`")
    search.add_argument("queries", help="query embeddings file (metaembed encode --role query), or inputs with --model")
    search.add_argument("--model", default=None, help="encode QUERIES (.jsonl or .txt) with this checkpoint")
    search.add_argument("--budget", type=int, nargs=2, metavar=("R_Q", "R_C"), help="retrieval budget (default: all)")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--shortlist", type=int, default=None, help="two-stage: re-rank this many (1,1) hits")
    search.add_argument("--mmap", action="store_true", help="memory-map the index instead of reading it")
    search.add_argument("--output", default=None, help="JSON-lines file (default: stdout)")
    for command in (index, search):
        command.add_argument("--batch-size", type=int, default=8)
        command.add_argument("--device", default=None, help="where --model encodes (default: cpu)")
        command.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(run=run_index)
    search.set_defaults(run=run_search)

    evaluate = commands.add_parser("evaluate", help="MMEB or ViDoRe at a sweep of budgets: results.json + results.md")
    evaluate.add_argument("benchmark", choices=("mmeb", "vidore"))
    evaluate.add_argument("model", help="MetaEmbed checkpoint folder or Hub id")
    evaluate.add_argument("--data", default=None, help="MMEB: the data set repo or a local copy (default "
                          "TIGER-Lab/MMEB-eval); ViDoRe: v1, v2 (default) or one data set's repo / local copy")
    evaluate.add_argument("--images", default=None, help="MMEB image folder (default: DATA/images)")
    evaluate.add_argument("--tasks", nargs="+", default=None, help="MMEB tasks, or ViDoRe data sets (default: all)")
    evaluate.add_argument("--budgets", type=int, nargs="+", default=None, metavar="R",
                          help="pairs R_Q R_C (default: 1 1 2 4 4 8 8 16 16 64, the paper's)")
    evaluate.add_argument("--language", default=None, help="ViDoRe v2: keep the queries of this language")
    evaluate.add_argument("--limit", type=int, default=None, help="MMEB: first N queries per task (a quick look)")
    evaluate.add_argument("--output", required=True, help="folder for results.json and results.md")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="model dtype")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(run=run_evaluate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # exits with 2 on bad arguments
    try:
        args.run(args)
    except CommandFailed as error:
        print(f"metaembed {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError) as error:  # bad input: the message names the item
        print(f"metaembed {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
