//! Voter placement seen from the failure domains: which clusters the group cannot lose.

use std::collections::BTreeMap;

/// Warnings about where the voters are, given the number of voters in each cluster (clusters
/// without voters may be left out). A group is warned about when losing one cluster would take
/// a majority of its voters with it, which is always so with two clusters. One cluster is a single
/// failure domain by choice and gets no warning.
pub fn voter_warnings(voters_by_cluster: &BTreeMap<String, usize>) -> Vec<String> {
    let holding: Vec<(&String, usize)> =
        voters_by_cluster.iter().filter(|(_, n)| **n > 0).map(|(c, n)| (c, *n)).collect();
    let total: usize = holding.iter().map(|(_, n)| n).sum();
    if holding.len() < 2 {
        return Vec::new();
    }
    let quorum = total / 2 + 1;
    let fatal: Vec<(&String, usize)> = holding.iter().copied().filter(|(_, n)| total - n < quorum).collect();
    if fatal.is_empty() {
        return Vec::new();
    }
    let witness = "add a voter in another failure domain, a witness: on a host outside these clusters run \
                   `trellis cluster join <token> --name witness --region <region> --data-dir <dir>` with a token \
                   from `trellis token create` (the group places it as a voter; it needs no workloads)";
    let spread = holding.iter().map(|(c, n)| format!("{c}: {n}")).collect::<Vec<_>>().join(", ");
    if holding.len() == 2 {
        return vec![format!(
            "only two clusters hold the control plane's voters ({spread}): losing either one stops writes (proxies \
             keep serving on what they know, but no change is committed until it returns); {witness}"
        )];
    }
    fatal
        .into_iter()
        .map(|(c, n)| {
            format!(
                "cluster {c} holds {n} of the {total} voters ({spread}): losing it stops writes; move voters out of it \
                 (`trellis controlplane remove`) or {witness}"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(v: &[(&str, usize)]) -> BTreeMap<String, usize> {
        v.iter().map(|(c, n)| (c.to_string(), *n)).collect()
    }

    #[test]
    fn one_cluster_is_a_choice_not_a_warning() {
        assert!(voter_warnings(&spread(&[("a", 1)])).is_empty());
        assert!(voter_warnings(&spread(&[("a", 3)])).is_empty());
        assert!(voter_warnings(&spread(&[])).is_empty());
    }

    #[test]
    fn two_clusters_always_warn_and_say_how_to_add_a_witness() {
        for v in [[("a", 1), ("b", 1)], [("a", 2), ("b", 1)], [("a", 2), ("b", 2)]] {
            let w = voter_warnings(&spread(&v));
            assert_eq!(w.len(), 1, "{v:?}: {w:?}");
            assert!(w[0].contains("only two clusters") && w[0].contains("witness"), "{w:?}");
        }
        // A cluster without voters is not a failure domain of the group.
        assert_eq!(voter_warnings(&spread(&[("a", 1), ("b", 1), ("c", 0)])).len(), 1);
    }

    #[test]
    fn three_clusters_warn_only_when_one_holds_a_majority() {
        assert!(voter_warnings(&spread(&[("a", 1), ("b", 1), ("c", 1)])).is_empty());
        assert!(voter_warnings(&spread(&[("a", 2), ("b", 2), ("c", 1)])).is_empty());
        let w = voter_warnings(&spread(&[("a", 3), ("b", 1), ("c", 1)]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("cluster a holds 3 of the 5 voters"), "{w:?}");
    }
}
