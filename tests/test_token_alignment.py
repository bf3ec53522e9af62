"""distill_plugins.token_alignment against brute-force references: the vocabulary mapping by least
edit distance and the DTW alignment (an exhaustive search over every monotone path on small inputs)."""
import os
import random
import sys

from conftest import REPO
from distill_plugins.token_alignment import dtw_alignment, normalize_token, vocabulary_mapping

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from alignment import reference as cell_by_cell_dtw  # noqa: E402  (FuseLLM / DSKD's form, cell by cell)


def levenshtein(a, b):
    """Textbook O(len a * len b) edit distance, written independently of the module."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def random_token(rng):
    word = "".join(rng.choice("abcde") for _ in range(rng.randint(1, 5)))
    return rng.choice(["", "▁", "Ġ"]) + word


def test_normalize_token_strips_word_markers():
    assert normalize_token("▁apple") == "apple" == normalize_token("Ġapple")
    assert normalize_token("</s>") == "</s>" and normalize_token("▁") == ""


def test_vocabulary_mapping_is_the_least_edit_distance_lowest_id():
    """FuseLLM's rule, brute force: the teacher's marker (here "Ġ") becomes the student's ("▁"), then
    the equal student token, else the first one at the least edit distance."""
    rng = random.Random(0)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    word = lambda: "".join(rng.choice("abcde") for _ in range(rng.randint(1, 5)))  # noqa: E731
    student = specials + [rng.choice(["", "▁"]) + word() for _ in range(60)]
    teacher = specials + [rng.choice(["", "Ġ"]) + word() for _ in range(80)]
    mapping = vocabulary_mapping(teacher, student)
    assert mapping[:4] == [0, 1, 2, 3]
    exact = 0
    for i, token in enumerate(teacher[4:], 4):
        query = token.replace("Ġ", "▁")
        dists = [levenshtein(query, s) for s in student[4:]]
        assert mapping[i] == 4 + dists.index(min(dists)), (token, student[mapping[i]])
        exact += min(dists) == 0
    assert exact > 10


def test_vocabulary_mapping_keeps_word_start_and_inner_pieces_apart():
    """"▁a" and "a" are different tokens: a vocabulary maps onto itself as the identity, and across
    marker conventions a word-start piece maps to a word-start piece."""
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "▁a", "a", "▁b", "b", "▁ab"]
    assert vocabulary_mapping(vocab, vocab) == list(range(len(vocab)))
    teacher = ["<s>", "<pad>", "</s>", "<unk>", "b", "Ġb", "Ġab", "a", "Ġa", "Ġabc"]
    assert vocabulary_mapping(teacher, vocab) == [0, 1, 2, 3, 7, 6, 8, 5, 4, 8]
    words = ["<s>", "<pad>", "</s>", "<unk>", "a", "b", "ab"]  # no markers at all
    assert vocabulary_mapping(teacher, words) == [0, 1, 2, 3, 5, 5, 6, 4, 4, 6]


def path_cost(path, a, b):
    return sum(levenshtein(normalize_token(a[i]), normalize_token(b[j])) for i, j in path)


def all_paths(n, m):
    """Every monotone path from (0, 0) to (n-1, m-1) with steps (1,1), (1,0), (0,1)."""
    def walk(i, j):
        if (i, j) == (n - 1, m - 1):
            yield [(i, j)]
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                for rest in walk(i + di, j + dj):
                    yield [(i, j)] + rest
    return walk(0, 0)


def test_dtw_alignment_is_an_optimal_monotone_path():
    rng = random.Random(1)
    for _ in range(40):
        a = [random_token(rng) for _ in range(rng.randint(1, 5))]
        b = [random_token(rng) for _ in range(rng.randint(1, 5))]
        aligned = dtw_alignment(a, b)
        path = [(i, j) for i, js in enumerate(aligned) for j in js]
        assert path[0] == (0, 0) and path[-1] == (len(a) - 1, len(b) - 1)
        for (i0, j0), (i1, j1) in zip(path, path[1:]):
            assert (i1 - i0, j1 - j0) in {(1, 1), (1, 0), (0, 1)}
        best = min(path_cost(p, a, b) for p in all_paths(len(a), len(b)))
        assert path_cost(path, a, b) == best


def test_dtw_alignment_equals_the_cell_by_cell_table_on_long_sequences():
    rng = random.Random(2)
    for n, m in [(1, 30), (30, 1), (57, 73), (120, 90)]:
        pool = [random_token(rng) for _ in range(12)]  # few distinct tokens: many equal costs, ties
        a = [rng.choice(pool) for _ in range(n)]
        b = [rng.choice(pool).replace("▁", "Ġ") for _ in range(m)]
        assert dtw_alignment(a, b) == cell_by_cell_dtw(a, b, distance=levenshtein)  # the test's own distance


def test_dtw_alignment_of_two_tokenizations():
    student = ["▁the", "▁blue", "berry", "</s>"]
    teacher = ["Ġthe", "Ġblue", "berr", "y", "</s>"]
    assert dtw_alignment(student, teacher) == [[0], [1], [2, 3], [4]]
    assert dtw_alignment(teacher, student) == [[0], [1], [2], [2], [3]]
    # the cheaper path wins even against the intuitive one: "blue"-"b" (3) + "berry"-"erry" (1) = 4
    # beats "berry"-"b" (4) + "berry"-"erry" (1) = 5
    assert dtw_alignment(student, ["Ġthe", "Ġblue", "b", "erry", "</s>"]) == [[0], [1, 2], [3], [4]]
    assert dtw_alignment([], teacher) == [] and dtw_alignment(student, []) == [[], [], [], []]
    assert dtw_alignment(student, list(student)) == [[0], [1], [2], [3]]
