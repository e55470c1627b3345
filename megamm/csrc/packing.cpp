// First-fit-decreasing sample packing, the fast path behind megamm.data.packing.
//
// A plain first-fit scans the open bins one by one, O(n * bins). Here the same placement is found
// in O(log n) per sample with a max segment tree// over the remaining capacity of every *possible* bin: there are at most n bins, and a bin not yet
// opened has the full capacity. Because bins are opened left to right, the leftmost leaf with
// room is either the first open bin with room or, if none has room, exactly the next new bin,
// so "first fit" and "open a new bin" are one query. The Python fallback (megamm/data/packing.py,
// `pack_python`) is the same algorithm, and the result is identical: same sort (length descending, ties by index ascending), same bin order, same order in a bin.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Max segment tree over `size` leaves, all starting at `initial`.
class MaxTree {
 public:
  MaxTree(std::size_t size, std::int64_t initial) {
    leaves_ = 1;
    while (leaves_ < size) leaves_ <<= 1;
    // Leaves past `size` also get `initial`; they are never reached because the query always
    // finds a leaf < size first (there are never more than `size` bins).
    tree_.assign(2 * leaves_, initial);
  }

  // Index of the leftmost leaf whose value is >= need; the caller guarantees one exists.
  std::size_t leftmost_at_least(std::int64_t need) const {
    std::size_t node = 1;
    while (node < leaves_) {
      node = tree_[2 * node] >= need ? 2 * node : 2 * node + 1;
    }
    return node - leaves_;
  }

  void subtract(std::size_t leaf, std::int64_t amount) {
    std::size_t node = leaf + leaves_;
    tree_[node] -= amount;
    for (node >>= 1; node >= 1; node >>= 1) {
      tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
    }
  }

 private:
  std::size_t leaves_;
  std::vector<std::int64_t> tree_;
};

std::vector<std::vector<std::int64_t>> pack_first_fit_decreasing(const std::vector<std::int64_t>& lengths,
                                                                 std::int64_t capacity) {
  if (capacity <= 0) {
    throw py::value_error("capacity must be positive, got " + std::to_string(capacity));
  }
  const std::size_t n = lengths.size();
  for (std::size_t i = 0; i < n; ++i) {
    if (lengths[i] < 0) {
      throw py::value_error("sample " + std::to_string(i) + " has a negative length " +
                            std::to_string(lengths[i]));
    }
    if (lengths[i] > capacity) {
      throw py::value_error("sample " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
                            " > capacity " + std::to_string(capacity) + "; truncate or drop it first");
    }
  }

  // Length descending, ties by index ascending: a stable sort on the length alone.
  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&lengths](std::int64_t a, std::int64_t b) { return lengths[a] > lengths[b]; });

  std::vector<std::vector<std::int64_t>> bins;
  if (n == 0) return bins;
  MaxTree remaining(n, capacity);
  for (std::int64_t index : order) {
    const std::int64_t length = lengths[index];
    const std::size_t bin = remaining.leftmost_at_least(length);
    if (bin == bins.size()) bins.emplace_back();  // no open bin had room: this is the next new one
    bins[bin].push_back(index);
    remaining.subtract(bin, length);
  }
  return bins;
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "First-fit-decreasing sample packing (C++ backend of megamm.data.packing).";
  // std::vector<int64_t> accepts a list of ints or a 1-D integer numpy array; floats are rejected,
  // as in the Python version.
  m.def("pack_first_fit_decreasing", &pack_first_fit_decreasing, py::arg("lengths"), py::arg("capacity"),
        "Assign sample indices to bins of `capacity` tokens, first fit decreasing; see "
        "megamm.data.packing.pack_first_fit_decreasing.");
}
