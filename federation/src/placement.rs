//! Voter placement seen from the failure domains: where the leader seats the voters, and which
//! clusters the group cannot lose.

use std::collections::BTreeMap;

/// Warnings about where the voters are, given the number of voters in each cluster (clusters
/// without voters may be left out). A group is warned about when losing one cluster would take
/// its quorum with it (with two clusters, one of them at least). One cluster is a single failure
/// domain by choice and gets no warning.
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
    if holding.len() == 2 && fatal.len() == 2 {
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

/// A member of the control-plane group, as voter placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seat {
    pub id: u64,
    pub cluster: String,
    pub region: String,
    pub voter: bool,
    /// A learner close enough to the leader's log to vote without slowing commits.
    pub caught_up: bool,
    /// The leader is never the one moved out.
    pub leader: bool,
}

/// One change of the voter set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Make this caught-up learner a voter.
    Promote(u64),
    /// Make this voter a learner (a caught-up learner of an unrepresented cluster takes its seat
    /// next).
    Demote(u64),
}

/// The next change that spreads the voters over failure domains: at most `max_voters`, filled
/// with caught-up learners of the clusters (then regions) that hold the fewest voters; when the
/// seats are full and a cluster without a voter has a caught-up learner, a voter of the cluster
/// holding the most (never the leader, never the last of its cluster) makes room. One step at a
/// time: membership changes go through joint consensus one by one.
pub fn next_step(seats: &[Seat], max_voters: usize) -> Option<Step> {
    let voters_in = |f: &dyn Fn(&Seat) -> bool| seats.iter().filter(|s| s.voter && f(s)).count();
    let voters = voters_in(&|_| true);
    // Learners worth a seat, best first: fewest voters in their cluster, then in their region.
    let rank = |s: &Seat| (voters_in(&|o| o.cluster == s.cluster), voters_in(&|o| o.region == s.region), s.id);
    let mut all: Vec<((usize, usize, u64), bool)> =
        seats.iter().filter(|s| !s.voter).map(|s| (rank(s), s.caught_up)).collect();
    all.sort_unstable();
    let best = all.iter().find(|(_, caught_up)| *caught_up).map(|(r, _)| *r)?;
    if voters < max_voters {
        // A learner of a less represented domain that is still catching up is waited for (with
        // a quorum of three already), rather than filling the seat with one of a crowded
        // cluster (which would then have to give it back).
        if voters >= 3 && all.first().is_some_and(|(r, caught_up)| !caught_up && r.0 < best.0) {
            return None;
        }
        return Some(Step::Promote(best.2));
    }
    if best.0 > 0 {
        return None;
    }
    // Seats are full and a cluster has no voter: take one from the most represented cluster.
    let mut per_cluster: BTreeMap<&str, usize> = BTreeMap::new();
    for s in seats.iter().filter(|s| s.voter) {
        *per_cluster.entry(s.cluster.as_str()).or_default() += 1;
    }
    let (crowded, n) = per_cluster.iter().max_by_key(|(c, n)| (**n, std::cmp::Reverse(**c)))?;
    if *n < 2 {
        return None;
    }
    seats.iter().filter(|s| s.voter && !s.leader && s.cluster == *crowded).map(|s| s.id).max().map(Step::Demote)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seat(id: u64, cluster: &str, region: &str, voter: bool) -> Seat {
        Seat { id, cluster: cluster.into(), region: region.into(), voter, caught_up: true, leader: id == 1 }
    }

    #[test]
    fn learners_of_unrepresented_clusters_and_regions_are_promoted_first() {
        let seats = vec![
            seat(1, "a", "us", true),
            seat(2, "a", "us", false),
            seat(3, "b", "us", false),
            seat(4, "c", "eu", false),
        ];
        // c: no voter in its cluster nor its region; b: none in its cluster; a: one.
        assert_eq!(next_step(&seats, 5), Some(Step::Promote(4)));
        let mut seats = seats;
        seats[3].voter = true;
        assert_eq!(next_step(&seats, 5), Some(Step::Promote(3)));
        seats[2].voter = true;
        assert_eq!(next_step(&seats, 5), Some(Step::Promote(2)));
        seats[1].voter = true;
        assert_eq!(next_step(&seats, 5), None, "nobody left to promote");
        // A learner still catching up waits.
        let mut lagging = seat(5, "d", "ap", false);
        lagging.caught_up = false;
        seats.push(lagging);
        assert_eq!(next_step(&seats, 5), None);
    }

    #[test]
    fn full_seats_make_room_for_a_cluster_without_a_voter() {
        let mut seats = vec![
            seat(1, "a", "us", true),
            seat(2, "a", "us", true),
            seat(3, "a", "us", true),
            seat(4, "b", "eu", true),
            seat(5, "c", "ap", true),
            seat(6, "d", "sa", false),
        ];
        // a holds three voters; its highest id that is not the leader gives its seat up.
        assert_eq!(next_step(&seats, 5), Some(Step::Demote(3)));
        seats[2].voter = false;
        assert_eq!(next_step(&seats, 5), Some(Step::Promote(6)));
        seats[5].voter = true;
        // Every cluster has a voter now; a's learner stays a learner.
        assert_eq!(next_step(&seats, 5), None);
        // After the demotion, a newcomer that lags for a moment is waited for: the demoted voter
        // does not take its seat back.
        seats[5].voter = false;
        seats[5].caught_up = false;
        assert_eq!(next_step(&seats, 5), None, "wait for d rather than re-promote a");
        seats[5].caught_up = true;
        assert_eq!(next_step(&seats, 5), Some(Step::Promote(6)));
        seats[5].voter = true;
        assert_eq!(next_step(&seats, 5), None);
        // With one voter per cluster there is nobody to move for a sixth cluster.
        let spread: Vec<Seat> = ["a", "b", "c", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, c)| seat(i as u64 + 1, c, c, true))
            .chain(std::iter::once(seat(9, "f", "f", false)))
            .collect();
        assert_eq!(next_step(&spread, 5), None);
    }

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
        for v in [[("a", 1), ("b", 1)], [("a", 2), ("b", 2)]] {
            let w = voter_warnings(&spread(&v));
            assert_eq!(w.len(), 1, "{v:?}: {w:?}");
            assert!(w[0].contains("only two clusters") && w[0].contains("witness"), "{w:?}");
        }
        // Losing the smaller one leaves a quorum: only the larger is named.
        let w = voter_warnings(&spread(&[("a", 2), ("b", 1)]));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("cluster a holds 2 of the 3 voters"), "{w:?}");
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
