// The part of jStat (npm `jstat`, no bundled types) that ampipe uses: Student's t distribution.
declare module "jstat" {
  export const jStat: {
    studentt: {
      cdf(x: number, dof: number): number;
      inv(p: number, dof: number): number;
    };
  };
}
