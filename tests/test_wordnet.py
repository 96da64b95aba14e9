"""Hierarchy.from_wordnet: the WNDB reader, id spellings, the first and deepest hypernym rules, classes at inner
nodes, chain collapsing, and the padded-LCA distances."""

import io
import os
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haframe_ext import Hierarchy, cli
from haframe_ext.hierarchy import HierarchyError
from haframe_ext.hierarchy.wordnet import find_wordnet, wordnet_search_paths

HEADER = ("  1 This software and database is being provided to you, the LICENSEE, by  \n"
          "  2 Princeton University under the following license.  \n")

# offset: (word, [(pointer symbol, target offset), ...]) -- listed in this order in the file
SYNSETS = {
    1740: ("entity", []),
    1930: ("physical_entity", [("@", 1740)]),
    2137: ("abstraction", [("@", 1740)]),
    2684: ("object", [("@", 1930)]),
    15388: ("animal", [("@", 2684)]),
    1317541: ("domestic_animal", [("@", 15388)]),
    2075296: ("carnivore", [("@", 15388)]),
    2083346: ("canine", [("@", 2075296)]),
    2084071: ("dog", [("@", 2083346), ("@", 1317541), ("~", 2085374)]),  # two hypernyms: the first wins
    2085374: ("toy_dog", [("@", 2084071)]),
    2085620: ("Chihuahua", [("@", 2085374)]),
    2087551: ("hound", [("@", 2084071)]),
    2088364: ("beagle", [("@", 2087551)]),
    2120997: ("feline", [("@", 2075296)]),
    2121620: ("cat", [("@", 2120997)]),
    2123045: ("tabby", [("@", 2121620)]),
    6355894: ("computer_file", [("@", 2137)]),
    6359193: ("web_site", [("@", 6355894)]),
    11000001: ("Fido", [("@i", 2087551)]),  # an instance: only an instance hypernym
    11000002: ("Lassie", [("@i", 2085374), ("@", 2087551)]),  # '@' is preferred to an earlier '@i'
}
CLASSES = ["n02085620", "n02088364", "n02123045", "n11000001", "n11000002", "n06359193"]
COLLAPSED = {  # child -> parent: only classes and nodes with two or more children stay
    "n02075296": "n00001740", "n06359193": "n00001740", "n02084071": "n02075296", "n02123045": "n02075296",
    "n02085620": "n02084071", "n02087551": "n02084071", "n02088364": "n02087551", "n11000001": "n02087551",
    "n11000002": "n02087551",
}
FULL = {  # child -> parent with every single-child chain kept
    "n00001930": "n00001740", "n00002137": "n00001740", "n00002684": "n00001930", "n00015388": "n00002684",
    "n02075296": "n00015388", "n02083346": "n02075296", "n02084071": "n02083346", "n02085374": "n02084071",
    "n02085620": "n02085374", "n02087551": "n02084071", "n02088364": "n02087551", "n11000001": "n02087551",
    "n11000002": "n02087551", "n02120997": "n02075296", "n02121620": "n02120997", "n02123045": "n02121620",
    "n06355894": "n00002137", "n06359193": "n06355894",
}


def wndb_text(synsets: dict) -> str:
    """A data.noun in WordNet's WNDB format (the reader does not need offsets to be byte offsets)."""
    out = HEADER
    for off, (word, ptrs) in sorted(synsets.items()):
        fields = " ".join(f"{sym} {target:08d} n 0000" for sym, target in ptrs)
        line = f" 03 n 01 {word} 0 {len(ptrs):03d} {fields} | gloss of {word}  \n".replace("  |", " |")
        out += f"{off:08d}{line}"
    return out


def write_wordnet(folder, synsets=SYNSETS) -> str:
    """Write data.noun into folder; return the folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "data.noun"), "w", encoding="utf-8") as fh:
        fh.write(wndb_text(synsets))
    return str(folder)


def parent_map(h: Hierarchy) -> dict:
    """child -> parent of every non-root node."""
    return {n: h.parent(n) for n in h.nodes if h.parent(n) is not None}


def padded_lca(h: Hierarchy) -> np.ndarray:
    """d[i, j] = D - depth(LCA(i, j)) by brute force on ancestor lists (D = the deepest class's depth)."""
    def path(n):  # [root, ..., n]
        return [n] if h.parent(n) is None else path(h.parent(n)) + [n]

    paths = [path(c) for c in h.classes]
    D = max(len(p) - 1 for p in paths)
    K = len(paths)
    d = np.zeros((K, K), dtype=np.int64)
    for i in range(K):
        for j in range(K):
            if i != j:
                common = 0
                while common < min(len(paths[i]), len(paths[j])) and paths[i][common] == paths[j][common]:
                    common += 1
                d[i, j] = D - (common - 1)
    return d


# ----------------------------------------------------------------------------- the fixture tree
def test_first_hypernym_and_collapsed_chains(tmp_path):
    h = Hierarchy.from_wordnet(CLASSES, write_wordnet(tmp_path))
    assert h.classes == CLASSES
    assert parent_map(h) == COLLAPSED
    assert h.root == "n00001740"


def test_chains_kept_when_asked(tmp_path):
    h = Hierarchy.from_wordnet(CLASSES, write_wordnet(tmp_path), collapse=False)
    assert parent_map(h) == FULL


def test_ids_from_a_file_and_an_open_stream(tmp_path):
    wn = write_wordnet(tmp_path / "wn")
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(CLASSES) + "\n\n")
    assert parent_map(Hierarchy.from_wordnet(str(ids), wn)) == COLLAPSED
    assert Hierarchy.from_wordnet(io.StringIO("\n".join(CLASSES)), wn).classes == CLASSES


def test_isa_file_with_spaces_and_with_tabs_gives_the_same_distances(tmp_path):
    h = Hierarchy.from_wordnet(CLASSES, write_wordnet(tmp_path))
    out = tmp_path / "isa.tsv"
    h.to_edges(out)
    tabbed = out.read_text()
    assert tabbed.count("\t") == len(COLLAPSED) and all(len(line.split("\t")) == 2 for line in tabbed.splitlines())
    spaced = tmp_path / "isa.txt"
    spaced.write_text(tabbed.replace("\t", " "))
    expected = padded_lca(h)
    np.testing.assert_array_equal(h.distances(), expected)
    for path in (out, spaced):
        back = Hierarchy.from_edges(path, classes=CLASSES)
        assert parent_map(back) == COLLAPSED
        np.testing.assert_array_equal(back.distances(), expected)


def test_nltk_zip_and_a_data_noun_path(tmp_path):
    zpath = tmp_path / "wordnet.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("wordnet/data.noun", wndb_text(SYNSETS))
    assert parent_map(Hierarchy.from_wordnet(CLASSES, zpath)) == COLLAPSED
    wn = write_wordnet(tmp_path / "wn")
    assert parent_map(Hierarchy.from_wordnet(CLASSES, os.path.join(wn, "data.noun"))) == COLLAPSED


def test_search_uses_nltk_data(tmp_path, monkeypatch):
    write_wordnet(tmp_path / "corpora" / "wordnet")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.delenv("WNHOME", raising=False)
    assert os.path.join(str(tmp_path), "corpora", "wordnet") in wordnet_search_paths()
    if not os.path.isfile("/usr/share/wordnet/data.noun"):  # the system copy comes first
        assert find_wordnet() == os.path.join(str(tmp_path), "corpora", "wordnet", "data.noun")


@pytest.mark.parametrize("inner,node_parent,kids", [
    ("n02084071", "n02075296", ["n02085620", "n02087551"]),  # dog: a branch point above Chihuahua and beagle
    ("n02085374", "n02084071", ["n02085620"]),  # toy dog: a single-child chain, kept because it is a class
    ("n00001740", None, ["n02075296", "n06359193"]),  # entity: the top itself
])
def test_a_class_at_an_inner_node_gets_a_leaf_below_its_node(tmp_path, inner, node_parent, kids):
    ids = CLASSES[:3] + [inner] + CLASSES[3:]
    h = Hierarchy.from_wordnet(ids, write_wordnet(tmp_path))
    node = inner + ":node"
    assert h.classes == ids and h.inner_classes == [inner]
    assert h.parent(inner) == node and h.children(node) == [inner] + kids and h.parent(node) == node_parent
    d, D = h.distances(), h.max_depth
    np.testing.assert_array_equal(d, padded_lca(h))
    for k in kids:  # one step below the node it stood for: D - depth(node) to everything under it
        under = [c for c in h.classes if k == c or k in h.ancestors(c)]
        assert all(d[3, ids.index(c)] == D - h.depth(node) for c in under)


def test_two_hypernyms_first_and_deepest(tmp_path):
    synsets = dict(SYNSETS)
    synsets[2084071] = ("dog", [("@", 1317541), ("@", 2083346)])  # domestic animal (depth 4) before canine (5)
    wn = write_wordnet(tmp_path, synsets)
    first = Hierarchy.from_wordnet(CLASSES, wn, collapse=False)
    deepest = Hierarchy.from_wordnet(CLASSES, wn, collapse=False, parent="deepest")
    assert first.parent("n02084071") == "n01317541" and deepest.parent("n02084071") == "n02083346"
    assert deepest.depth("n02085620") == first.depth("n02085620") + 1
    for h, rule in ((first, "first"), (deepest, "deepest")):  # collapse=False: the tree's nodes are the synsets
        assert h.wordnet_info == {"parent": rule, "synsets": len(h.nodes), "several_hypernyms": 1}
    assert Hierarchy.from_wordnet(CLASSES, wn).wordnet_info["synsets"] == len(first.nodes)


@pytest.mark.parametrize("kwargs,key", [
    ({"parent": "longest"}, "unknown WordNet parent rule 'longest'; valid: first, deepest"),
    ({"internal_classes": "leaves"}, "unknown internal_classes 'leaves'; valid: leaf, error"),
])
def test_bad_rules_are_named(tmp_path, kwargs, key):
    with pytest.raises(HierarchyError, match=key.replace("(", r"\(")):
        Hierarchy.from_wordnet(CLASSES, write_wordnet(tmp_path), **kwargs)


def test_other_spellings_of_an_id_name_the_class_by_its_id(tmp_path):
    h = Hierarchy.from_wordnet(["02085620-n", "N02088364", " n02123045 "], write_wordnet(tmp_path))
    assert h.classes == ["n02085620", "n02088364", "n02123045"]


# ----------------------------------------------------------------------------- mistakes
def test_missing_wordnet_names_where_it_looked_and_how_to_install(tmp_path, monkeypatch):
    import haframe_ext.hierarchy.wordnet as wn

    monkeypatch.setattr(wn, "wordnet_search_paths", lambda: [str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_wordnet(CLASSES)
    msg = str(info.value)
    assert str(tmp_path / "a") in msg and str(tmp_path / "b") in msg
    assert "apt-get install wordnet-base" in msg and "nltk.download('wordnet')" in msg
    with pytest.raises(HierarchyError, match="no data.noun at"):
        Hierarchy.from_wordnet(CLASSES, tmp_path / "nowhere")


def test_a_class_above_another_class_names_both_under_error(tmp_path):
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_wordnet(["n02088364", "n02084071", "n02123045"], write_wordnet(tmp_path),
                               internal_classes="error")
    msg = str(info.value)
    assert "n02084071 (dog) is an ancestor of class id n02088364 (beagle)" in msg and "'leaf'" in msg


@pytest.mark.parametrize("ids,key", [
    (["n02085620", "02088364"], "is not a WordNet noun id"),
    (["n02085620", "n0208836x"], "is not a WordNet noun id"),
    (["n02085620", "n02085620"], "duplicate id 'n02085620' (first at classes[0])"),
    (["n02085620", "n02088364", "02085620-n"], "classes[2]: '02085620-n' is the id 'n02085620' spelled another way"),
    (["N02088364", "n02085620", "n02088364"], "'n02088364' is the id 'N02088364' spelled another way"),
    (["n02085620", "n02085620-n"], "is not a WordNet noun id"),
    (["n02085620", "n09999999"], "n09999999 is not a noun synset"),
    (["n02085620"], "at least 2 class ids"),
    (["n02085620", "n" + "9" * 100_000], "(100001 characters)"),
])
def test_bad_ids(tmp_path, ids, key):
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_wordnet(ids, write_wordnet(tmp_path))
    assert key in str(info.value) and len(str(info.value)) < 600


def test_a_hypernym_missing_from_the_file_is_named(tmp_path):
    synsets = dict(SYNSETS)
    del synsets[2087551]  # hound
    with pytest.raises(HierarchyError, match=r"n02087551, the hypernym of n02088364 \(beagle\)"):
        Hierarchy.from_wordnet(CLASSES, write_wordnet(tmp_path, synsets))


def test_malformed_synset_line_is_quoted_short(tmp_path):
    wn = write_wordnet(tmp_path)
    path = os.path.join(wn, "data.noun")
    with open(path, "a") as fh:
        fh.write("12000000 03 n 01 broken 0 009 @ 00001740 n 0000 " + "x" * 1_000_000 + "\n")
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_wordnet(["n12000000", "n02085620"], wn)
    msg = str(info.value)
    assert "malformed synset line for n12000000" in msg and len(msg) < 600


def test_not_a_wndb_file(tmp_path):
    (tmp_path / "data.noun").write_text("parent\tchild\n")
    with pytest.raises(HierarchyError, match="WNDB data.noun format"):
        Hierarchy.from_wordnet(CLASSES, tmp_path)


def test_cycle_in_a_damaged_database(tmp_path):
    synsets = dict(SYNSETS)
    synsets[1740] = ("entity", [("@", 2085620)])
    with pytest.raises(HierarchyError, match="form a cycle"):
        Hierarchy.from_wordnet(CLASSES, write_wordnet(tmp_path, synsets))


# ----------------------------------------------------------------------------- random trees (hypothesis)
@st.composite
def random_trees(draw):
    """(parents list, class order) of a random tree: node i > 0 hangs below a node before it."""
    n = draw(st.integers(3, 40))
    parents = [None] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    has_child = {p for p in parents if p is not None}
    leaves = [i for i in range(n) if i not in has_child]
    order = draw(st.permutations(leaves))
    return parents, list(order)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(random_trees(), st.randoms(use_true_random=False))
def test_random_trees_round_trip_and_padded_lca(tmp_path_factory, tree, rnd):
    parents, order = tree
    if len(order) < 2:
        return  # a chain: one class, no pairs
    off = {i: 1000 + 97 * i for i in range(len(parents))}  # synset offsets
    synsets = {}
    for i, p in enumerate(parents):
        ptrs = [] if p is None else [("@", off[p])]
        if p is not None and p > 0:  # a second hypernym after the first: never followed
            ptrs.append(("@", off[rnd.randrange(p)]))
        synsets[off[i]] = (f"s{i}", ptrs)
    folder = write_wordnet(tmp_path_factory.mktemp("wn"), synsets)
    ids = [f"n{off[i]:08d}" for i in order]
    h = Hierarchy.from_wordnet(ids, folder, collapse=False)
    assert parent_map(h) == {f"n{off[i]:08d}": f"n{off[p]:08d}" for i, p in enumerate(parents) if p is not None}
    expected = padded_lca(h)
    np.testing.assert_array_equal(h.distances(), expected)
    # the same tree from an isa file, with spaces and with tabs
    text = "".join(f"n{off[p]:08d}\tn{off[i]:08d}\n" for i, p in enumerate(parents) if p is not None)
    for sep in ("\t", " "):
        back = Hierarchy.from_edges(io.StringIO(text.replace("\t", sep)), classes=ids)
        np.testing.assert_array_equal(back.distances(), expected)
    collapsed = Hierarchy.from_wordnet(ids, folder)
    for node in collapsed.nodes:  # every kept node is a class or a branch point
        assert node in ids or len(collapsed.children(node)) >= 2
    np.testing.assert_array_equal(collapsed.distances(), padded_lca(collapsed))


@st.composite
def random_dags(draw):
    """(hypernym lists, class order) of a random WordNet-like graph: node i > 0 has 1-3 hypernyms before it."""
    n = draw(st.integers(3, 40))
    hyper = [[]] + [draw(st.lists(st.integers(0, i - 1), min_size=1, max_size=min(3, i), unique=True))
                    for i in range(1, n)]
    classes = draw(st.lists(st.integers(1, n - 1), min_size=2, max_size=n - 1, unique=True))
    return hyper, classes


def _closure(hyper, i):
    """Every ancestor of node i through any hypernym path."""
    out, stack = set(), list(hyper[i])
    while stack:
        j = stack.pop()
        if j not in out:
            out.add(j)
            stack.extend(hyper[j])
    return out


def _longest_up(hyper, i):
    """Edges on the longest hypernym path from i to the top."""
    return max((1 + _longest_up(hyper, j) for j in hyper[i]), default=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(random_dags(), st.sampled_from(["first", "deepest"]), st.booleans())
def test_random_graphs_keep_wordnet_ancestors(tmp_path_factory, dag, rule, collapse):
    hyper, order = dag
    off = {i: 1000 + 97 * i for i in range(len(hyper))}
    name = {i: f"n{off[i]:08d}" for i in off}
    folder = write_wordnet(tmp_path_factory.mktemp("wn"), {off[i]: (f"s{i}", [("@", off[j]) for j in hs])
                                                           for i, hs in enumerate(hyper)})
    ids = [name[i] for i in order]
    h = Hierarchy.from_wordnet(ids, folder, parent=rule, collapse=collapse)
    index = {v: k for k, v in name.items()}
    ups = {c: [index[a.removesuffix(":node")] for a in h.ancestors(c)] for c in ids}  # as WordNet nodes
    inner = [c for c in ids if any(index[c] in ups[x] for x in ids if x != c)]
    assert h.inner_classes == inner
    for c in ids:
        assert all(a in _closure(hyper, index[c]) or a == index[c] for a in ups[c])  # WordNet ancestors only
        i = index[c]
        chosen = max(hyper[i], key=lambda j: _longest_up(hyper, j)) if rule == "deepest" else hyper[i][0]
        if not collapse:
            assert ups[c][0] == (i if c in inner else chosen)  # its own node, or the chosen hypernym
            assert ups[c][int(c in inner)] == chosen  # and above its own node, the chosen hypernym
            if rule == "deepest":
                assert h.depth(c) == _longest_up(hyper, i) + (1 if c in inner else 0)
    assert h.wordnet_info["several_hypernyms"] <= h.wordnet_info["synsets"]
    np.testing.assert_array_equal(h.distances(), padded_lca(h))
    edges = io.StringIO()
    h.to_edges(edges)
    assert Hierarchy.from_edges(io.StringIO(edges.getvalue()), ids).distance_digest() == h.distance_digest()


# ----------------------------------------------------------------------------- the CLI
def test_cli_wordnet_ids_writes_the_edges(tmp_path, capsys):
    wn = write_wordnet(tmp_path / "wn")
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "edges.tsv"
    assert cli.main(["hierarchy", "--wordnet-ids", str(ids), "--wordnet", wn, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classes K                  6" in printed and "nodes                      10" in printed
    assert "leaf depths                1 to 4" in printed
    assert parent_map(Hierarchy.from_edges(out, classes=CLASSES)) == COLLAPSED
    assert "classes at inner nodes     0\n" in printed
    assert f"several WordNet hypernyms  1 of the {len(FULL) + 1} synsets on the paths (kept: the first one)" in printed


def test_cli_inner_classes_and_the_deepest_rule(tmp_path, capsys):
    synsets = dict(SYNSETS)
    synsets[2084071] = ("dog", [("@", 1317541), ("@", 2083346)])
    wn = write_wordnet(tmp_path / "wn", synsets)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(CLASSES + ["n02084071", "n02075296"]) + "\n")
    out = tmp_path / "edges.tsv"
    argv = ["hierarchy", "--wordnet-ids", str(ids), "--wordnet", wn, "--gamma", "3"]
    assert cli.main(argv + ["--wordnet-parent", "deepest", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classes at inner nodes     2 (each a leaf below its node, renamed '<class>:node')" in printed
    assert "(kept: the deepest one)" in printed and "s_min (gamma 3)" in printed
    h = Hierarchy.from_wordnet(ids, wn, parent="deepest")
    assert Hierarchy.from_edges(out, h.classes).distance_digest() == h.distance_digest()
    assert cli.main(argv + ["--internal-classes", "error"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("haframe: error: class id n02") and "is an ancestor of class id" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv,key", [
    (["hierarchy", "--wordnet-ids", "IDS", "cifar100"], "without a hierarchy"),
    (["hierarchy", "--wordnet-ids", "IDS", "--wordnet", "NOWHERE"], "no data.noun at"),
    (["hierarchy", "--wordnet-ids", "MISSING", "--wordnet", "WN"], "WordNet id file not found"),
])
def test_cli_wordnet_mistakes_are_one_line(tmp_path, capsys, argv, key):
    wn = write_wordnet(tmp_path / "wn")
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(CLASSES) + "\n")
    subst = {"IDS": str(ids), "WN": wn, "NOWHERE": str(tmp_path / "nowhere"), "MISSING": str(tmp_path / "x")}
    assert cli.main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("haframe: error:") and key in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- the system WordNet
def _system_wordnet():
    try:
        return find_wordnet()
    except HierarchyError as exc:
        pytest.skip(f"no WordNet installed ({str(exc)[:120]}...); apt-get install wordnet-base")


def test_system_wordnet_tiered_imagenet_classes():
    _system_wordnet()
    ref = Hierarchy.builtin("tiered_imagenet_h")
    h = Hierarchy.from_wordnet(ref.classes)
    assert h.parent("n01440764") == "n01439121" and h.parent("n02088364") == "n02087551"  # tench, beagle
    assert h.root == "n00001930" and len(h.nodes) - 1 == 841
    a, b = h.distances(), ref.distances()
    iu = np.triu_indices(len(a), 1)
    assert (a[iu] == b[iu]).mean() > 0.94  # 94.75% of the pairs of the published tree


def test_ids_with_non_ascii_digits_are_not_wordnet_ids(tmp_path):
    """Issue 22 item 19: full-width digits matched ``\\d``, and the ids then found nothing ("hierarchy is empty")."""
    with pytest.raises(HierarchyError, match="is not a WordNet noun id"):
        Hierarchy.from_wordnet(["n02085620", "n０２０８８３６４"], write_wordnet(tmp_path))
