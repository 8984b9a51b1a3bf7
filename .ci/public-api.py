#!/usr/bin/env python3
"""The public API of a crate, one item per line, from rustdoc's JSON output.

    python3 .ci/public-api.py target/doc/diesel_runsync.json > api.txt

Walks the crate from its root through public modules and re-exports, and
prints every public item reachable there: modules, structs (with their
public fields), enums (with their variants), traits (with their items),
functions and methods with their signatures, constants, statics, type
aliases, macros, and each trait implemented by a public type (auto traits
such as Send and Sync included: losing one breaks users). Used by
`.ci/public-api` to compare the API with the snapshot kept in
`runsync/public-api.txt`. Written against rustdoc JSON format version 57
(Rust 1.95); an unknown format fails loudly rather than printing less.
"""
import json
import sys

SUPPORTED_FORMATS = {57}
# Item id -> its path (rustdoc's "paths"), for paths the JSON leaves empty.
PATHS = {}


def main():
    doc = json.load(open(sys.argv[1]))
    if doc["format_version"] not in SUPPORTED_FORMATS:
        sys.exit(f"rustdoc JSON format {doc['format_version']} is not one this script knows "
                 f"({sorted(SUPPORTED_FORMATS)}): update .ci/public-api.py")
    PATHS.update(doc["paths"])
    api = Api(doc)
    root = doc["index"][str(doc["root"])]
    api.module(root, root["name"])
    print("\n".join(sorted(set(api.lines))))


class Api:
    def __init__(self, doc):
        self.index = doc["index"]
        self.paths = doc["paths"]
        self.lines = []
        self.seen = set()

    def item(self, id_):
        return self.index.get(str(id_))

    def module(self, module, path):
        self.lines.append(f"pub mod {path}")
        for child_id in module["inner"]["module"]["items"]:
            child = self.item(child_id)
            if child is None or child["visibility"] != "public":
                continue
            self.visit(child, path)

    def visit(self, item, parent, name=None):
        kind, inner = next(iter(item["inner"].items()))
        name = name or item["name"]
        path = f"{parent}::{name}"
        if kind == "use":
            target = self.item(inner["id"]) if inner["id"] is not None else None
            if target is None:
                self.lines.append(f"pub use {path} = {inner['source']}")
            elif inner["is_glob"]:
                for child_id in target["inner"]["module"]["items"]:
                    child = self.item(child_id)
                    if child and child["visibility"] == "public":
                        self.visit(child, parent)
            else:
                self.visit(target, parent, inner["name"])
            return
        key = (path, item["id"])
        if key in self.seen:
            return
        self.seen.add(key)
        if kind == "module":
            self.module(item, path)
        elif kind == "struct":
            self.lines.append(f"pub struct {path}{generics(inner['generics'])}")
            fields = inner["kind"].get("plain", {}).get("fields", []) if isinstance(inner["kind"], dict) else []
            if isinstance(inner["kind"], dict) and "tuple" in inner["kind"]:
                fields = [f for f in inner["kind"]["tuple"] if f is not None]
            for field_id in fields:
                field = self.item(field_id)
                if field and field["visibility"] == "public":
                    self.lines.append(f"pub {path}::{field['name']}: {ty(field['inner']['struct_field'])}")
            self.impls(inner["impls"], path)
        elif kind == "enum":
            self.lines.append(f"pub enum {path}{generics(inner['generics'])}")
            for variant_id in inner["variants"]:
                variant = self.item(variant_id)
                self.lines.append(f"pub {path}::{variant['name']}{variant_shape(self, variant)}")
            self.impls(inner["impls"], path)
        elif kind == "trait":
            unsafe = "unsafe " if inner["is_unsafe"] else ""
            self.lines.append(f"pub {unsafe}trait {path}{generics(inner['generics'])}"
                              f"{bounds_suffix(inner['bounds'])}")
            for member_id in inner["items"]:
                member = self.item(member_id)
                self.member(member, path, in_trait=True)
        elif kind == "function":
            self.lines.append(f"pub {function(name, inner, path_prefix=parent + '::')}")
        elif kind == "constant":
            self.lines.append(f"pub const {path}: {ty(inner['type'])}")
        elif kind == "static":
            self.lines.append(f"pub static {path}: {ty(inner['type'])}")
        elif kind == "type_alias":
            self.lines.append(f"pub type {path}{generics(inner['generics'])} = {ty(inner['type'])}")
        elif kind in ("macro", "proc_macro"):
            self.lines.append(f"pub macro {path}!")
        else:
            self.lines.append(f"pub {kind} {path}")

    def impls(self, impl_ids, path):
        for impl_id in impl_ids:
            impl_item = self.item(impl_id)
            if impl_item is None:
                continue
            impl = impl_item["inner"]["impl"]
            if impl["blanket_impl"] is not None:
                continue
            if impl["trait"] is None:
                for member_id in impl["items"]:
                    member = self.item(member_id)
                    if member and member["visibility"] == "public":
                        self.member(member, path, in_trait=False)
            else:
                negative = "!" if impl["is_negative"] else ""
                self.lines.append(f"impl{generics(impl['generics'])} {negative}{path_ty(impl['trait'])} "
                                  f"for {ty(impl['for'])}{where_clause(impl['generics'])}")

    def member(self, member, parent, in_trait):
        kind, inner = next(iter(member["inner"].items()))
        prefix = "" if in_trait else "pub "
        if kind == "function":
            self.lines.append(f"{prefix}{function(member['name'], inner, path_prefix=parent + '::')}")
        elif kind == "assoc_const":
            self.lines.append(f"{prefix}const {parent}::{member['name']}: {ty(inner['type'])}")
        elif kind == "assoc_type":
            self.lines.append(f"{prefix}type {parent}::{member['name']}{bounds_suffix(inner.get('bounds', []))}")
        else:
            self.lines.append(f"{prefix}{kind} {parent}::{member['name']}")


def variant_shape(api, variant):
    kind = variant["inner"]["variant"]["kind"]
    if kind == "plain":
        return ""
    if "tuple" in kind:
        return "(" + ", ".join(ty(api.item(f)["inner"]["struct_field"]) if f is not None else "_"
                               for f in kind["tuple"]) + ")"
    if "struct" in kind:
        return " { " + ", ".join(f"{api.item(f)['name']}: {ty(api.item(f)['inner']['struct_field'])}"
                                 for f in kind["struct"]["fields"]) + " }"
    return repr(kind)


def function(name, inner, path_prefix):
    header = inner["header"]
    quals = "".join(q for q, on in (("const ", header["is_const"]), ("async ", header["is_async"]),
                                    ("unsafe ", header["is_unsafe"])) if on)
    sig = inner["sig"]
    args = []
    for arg_name, arg_ty in sig["inputs"]:
        if arg_name == "self":
            rendered = ty(arg_ty)
            args.append({"Self": "self", "&Self": "&self", "&mut Self": "&mut self"}.get(rendered, f"self: {rendered}"))
        else:
            args.append(f"{arg_name}: {ty(arg_ty)}")
    output = f" -> {ty(sig['output'])}" if sig["output"] is not None else ""
    return (f"{quals}fn {path_prefix}{name}{generics(inner['generics'])}({', '.join(args)}){output}"
            f"{where_clause(inner['generics'])}")


def generics(g):
    params = []
    for p in g["params"]:
        kind = p["kind"]
        if "lifetime" in kind:
            params.append(p["name"])
        elif "type" in kind:
            if kind["type"]["is_synthetic"]:
                continue
            params.append(p["name"] + bounds_suffix(kind["type"]["bounds"]))
        elif "const" in kind:
            params.append(f"const {p['name']}: {ty(kind['const']['type'])}")
    return f"<{', '.join(params)}>" if params else ""


def where_clause(g):
    preds = []
    for pred in g["where_predicates"]:
        if "bound_predicate" in pred:
            b = pred["bound_predicate"]
            preds.append(f"{ty(b['type'])}{bounds_suffix(b['bounds'])}")
        elif "lifetime_predicate" in pred:
            lp = pred["lifetime_predicate"]
            preds.append(f"{lp['lifetime']}: {' + '.join(lp['outlives'])}")
        elif "eq_predicate" in pred:
            preds.append(f"{ty(pred['eq_predicate']['lhs'])} = {term(pred['eq_predicate']['rhs'])}")
    return f" where {', '.join(preds)}" if preds else ""


def bounds_suffix(bounds):
    rendered = [bound(b) for b in bounds]
    return f": {' + '.join(rendered)}" if rendered else ""


def bound(b):
    if "trait_bound" in b:
        tb = b["trait_bound"]
        modifier = {"none": "", "maybe": "?", "maybe_const": "~const "}.get(tb["modifier"], "")
        return modifier + path_ty(tb["trait"])
    if "outlives" in b:
        return b["outlives"]
    if "use" in b:
        return "use<" + ", ".join(str(x.get("lifetime", x.get("param", x))) if isinstance(x, dict) else str(x)
                                  for x in b["use"]) + ">"
    return repr(b)


def path_ty(p):
    path = p["path"]
    if not path and str(p.get("id")) in PATHS:
        path = PATHS[str(p["id"])]["path"][-1]
    return path + generic_args(p.get("args"))


def generic_args(args):
    if not args:
        return ""
    if "angle_bracketed" in args:
        ab = args["angle_bracketed"]
        parts = [generic_arg(a) for a in ab["args"]]
        for c in ab["constraints"]:
            binding = c["binding"]
            if "equality" in binding:
                parts.append(f"{c['name']}{generic_args(c.get('args'))} = {term(binding['equality'])}")
            else:
                parts.append(f"{c['name']}{bounds_suffix(binding['constraint'])}")
        return f"<{', '.join(parts)}>" if parts else ""
    if "parenthesized" in args:
        pa = args["parenthesized"]
        out = f" -> {ty(pa['output'])}" if pa["output"] is not None else ""
        return f"({', '.join(ty(t) for t in pa['inputs'])}){out}"
    return ""


def generic_arg(a):
    if "type" in a:
        return ty(a["type"])
    if "lifetime" in a:
        return a["lifetime"]
    if "const" in a:
        return a["const"].get("expr", "_")
    return "_"


def term(t):
    if "type" in t:
        return ty(t["type"])
    return t.get("constant", {}).get("expr", "_")


def ty(t):
    if t is None:
        return "()"
    kind, v = next(iter(t.items()))
    if kind == "resolved_path":
        return path_ty(v)
    if kind == "generic":
        return v
    if kind == "primitive":
        return v
    if kind == "borrowed_ref":
        lifetime = f"{v['lifetime']} " if v["lifetime"] else ""
        return f"&{lifetime}{'mut ' if v['is_mutable'] else ''}{ty(v['type'])}"
    if kind == "raw_pointer":
        return f"*{'mut' if v['is_mutable'] else 'const'} {ty(v['type'])}"
    if kind == "tuple":
        return f"({', '.join(ty(x) for x in v)}{',' if len(v) == 1 else ''})"
    if kind == "slice":
        return f"[{ty(v)}]"
    if kind == "array":
        return f"[{ty(v['type'])}; {v['len']}]"
    if kind == "impl_trait":
        return "impl " + " + ".join(bound(b) for b in v)
    if kind == "dyn_trait":
        traits = [path_ty(x["trait"]) for x in v["traits"]]
        if v.get("lifetime"):
            traits.append(v["lifetime"])
        return "dyn " + " + ".join(traits)
    if kind == "qualified_path":
        trait = f" as {path_ty(v['trait'])}" if v.get("trait") else ""
        return f"<{ty(v['self_type'])}{trait}>::{v['name']}{generic_args(v.get('args'))}"
    if kind == "function_pointer":
        sig = v["sig"]
        out = f" -> {ty(sig['output'])}" if sig["output"] is not None else ""
        return f"fn({', '.join(ty(x[1]) for x in sig['inputs'])}){out}"
    if kind == "infer":
        return "_"
    return repr(t)


if __name__ == "__main__":
    main()
