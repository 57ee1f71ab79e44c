//! Import cycles in a graph of files: the strongly connected components (Tarjan's algorithm)
//! and, to show a reader one concrete loop, the shortest cycle through a component.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Components of more than one node, each sorted, in order of their first node.
pub fn strongly_connected<N: Ord + Clone>(edges: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct Tarjan<'g, N: Ord> {
        edges: &'g BTreeMap<N, BTreeSet<N>>,
        index: BTreeMap<&'g N, usize>,
        low: BTreeMap<&'g N, usize>,
        stack: Vec<&'g N>,
        on_stack: BTreeSet<&'g N>,
        out: Vec<Vec<N>>,
    }
    impl<'g, N: Ord + Clone> Tarjan<'g, N> {
        fn visit(&mut self, v: &'g N) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().expect("v is on the stack");
                    self.on_stack.remove(w);
                    component.push(w.clone());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out.sort();
    t.out
}

/// The shortest cycle from `start` back to itself inside `component`, as the nodes in order
/// (`start` first, not repeated at the end).
pub fn shortest_cycle<N: Ord + Clone>(
    edges: &BTreeMap<N, BTreeSet<N>>,
    component: &[N],
    start: &N,
) -> Vec<N> {
    let inside: BTreeSet<&N> = component.iter().collect();
    let mut came_from: BTreeMap<&N, &N> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in edges.get(v).into_iter().flatten() {
            if !inside.contains(w) {
                continue;
            }
            if w == start {
                let mut cycle = vec![v.clone()];
                let mut at = v;
                while at != start {
                    at = came_from[at];
                    cycle.push(at.clone());
                }
                cycle.reverse();
                return cycle;
            }
            if !came_from.contains_key(w) {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    vec![start.clone()]
}

#[test]
fn finds_each_cycle_and_ignores_what_only_points_into_one() {
    let mut edges: BTreeMap<u8, BTreeSet<u8>> = BTreeMap::new();
    for (a, b) in [(1, 2), (2, 3), (3, 1), (3, 4), (4, 5), (5, 4), (6, 1)] {
        edges.entry(a).or_default().insert(b);
    }
    assert_eq!(strongly_connected(&edges), vec![vec![1, 2, 3], vec![4, 5]]);
    assert_eq!(shortest_cycle(&edges, &[1, 2, 3], &2), vec![2, 3, 1]);
    edges.get_mut(&3).unwrap().remove(&1);
    assert_eq!(strongly_connected(&edges), vec![vec![4, 5]]);
}
